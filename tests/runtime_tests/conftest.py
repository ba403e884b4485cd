"""Session fixtures over the bundled assets, shared by every runtime test.

The fp32 evaluation of SmolLM2-135M on 100 windows x 512 tokens takes about 2.5 minutes
on 2 CPU cores, so the tokenized text, the model and the baseline perplexity are computed
once per session and shared.
"""

from __future__ import annotations

import pytest
import torch

from qmodel_runtime import assets, data, evaluate

EVAL_WINDOWS = 100  # the "first 100 windows of 512 tokens"
WINDOW = 512


@pytest.fixture(scope="session")
def smollm2_path():
    return assets.model_path("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """The fp32 reference model (read-only: tests must not modify it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def wiki_eval_ids(smollm2_tokenizer):
    return data.tokenize(smollm2_tokenizer, assets.wiki_text("evaluation"))


@pytest.fixture(scope="session")
def wiki_calib_ids(smollm2_tokenizer):
    return data.tokenize(smollm2_tokenizer, assets.wiki_text("calibration"))


@pytest.fixture(scope="session")
def smollm2_eval_windows(wiki_eval_ids):
    """The first 100 non-overlapping 512-token windows of wiki-vital's evaluation split."""
    return data.token_windows(wiki_eval_ids, WINDOW, limit=EVAL_WINDOWS)


@pytest.fixture(scope="session")
def smollm2_baseline_ppl(smollm2_model, smollm2_eval_windows) -> evaluate.PerplexityResult:
    """fp32 perplexity of the unquantized model on those windows (measured: 14.094)."""
    return evaluate.perplexity(smollm2_model, smollm2_eval_windows, batch_size=4, desc="fp32 baseline")
