"""The quantize Job: ``python -m qmodel_runtime.jobs.quantize [--input PATH] [--result PATH]``.

Input: one JSON document (docs/contracts.md) in ``--input PATH`` or the environment
variable ``QMODEL_JOB_INPUT``, validated (``jobs.spec.JobInput``) together with the source
model's files and architecture before any heavy work. Then, with progress on stderr:

  1. tokenize the calibration and validation texts into windows;
  2. baseline perplexity, the source model streamed layer by layer;
  3. quantize layer by layer (GPTQ or RTN), packed layers written to shards as they finish;
  4. quantized perplexity of the checkpoint as written (read back and dequantized);
  5. ``qmodel-manifest.json`` LAST, then upload to ``<artifacts.uri>/<model>/<revision>/``.

Output: the result JSON (under 4 KiB) in the termination log (``--result PATH``,
``QMODEL_RESULT_PATH``, default /dev/termination-log) and exit 0 whether or not the
perplexity gate passed (the operator decides). Any failure: exit 1 (2 for bad input) and
one line of plain text there saying what went wrong and what to change.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qmodel_runtime import data, streaming
from qmodel_runtime.checkpoint import open_quantized
from qmodel_runtime.gptq import HessianError
from qmodel_runtime.jobs import report, transfer
from qmodel_runtime.jobs.inspect import ModelInfo, inspect_model, load_tokenizer
from qmodel_runtime.jobs.spec import InputError, JobInput, parse_input
from qmodel_runtime.sequential import quantize_checkpoint
from qmodel_runtime.storage import StorageError

log = logging.getLogger("qmodel.job")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_RESULT = "/dev/termination-log"


class JobFailed(RuntimeError):
    """A failure with a reason for the user (one line)."""


@dataclass(frozen=True)
class JobSettings:
    """How this run executes (not part of the spec): parsed once from flags and environment."""

    result_path: Path
    device: torch.device
    work_dir: Path
    calibration_batch: int = 8  # windows per forward call while calibrating
    eval_batch: int = 8
    max_shard_bytes: int = 4 << 30
    keep_work: bool = False
    env: Mapping[str, str] = field(default_factory=dict, repr=False)


def parse_settings(argv: list[str] | None, env: Mapping[str, str]) -> tuple[JobSettings, str | None]:
    """-> (settings, input text or None when neither --input nor QMODEL_JOB_INPUT is given)."""
    parser = argparse.ArgumentParser(
        prog="python -m qmodel_runtime.jobs.quantize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", type=Path, help="the job input JSON file (else $QMODEL_JOB_INPUT)")
    parser.add_argument(
        "--result", type=Path, help=f"where the result goes (else $QMODEL_RESULT_PATH, {DEFAULT_RESULT})"
    )
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument(
        "--work-dir", type=Path, help="scratch space for the artifact (default: a temp folder)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward call (default 8)")
    parser.add_argument("--max-shard-mib", type=int, default=4096, help="safetensors shard size limit")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = JobSettings(
        result_path=args.result or Path(env.get("QMODEL_RESULT_PATH") or DEFAULT_RESULT),
        device=device,
        work_dir=args.work_dir or Path(tempfile.mkdtemp(prefix="qmodel-job-")),
        calibration_batch=max(1, args.batch_size),
        eval_batch=max(1, args.batch_size),
        max_shard_bytes=max(1, args.max_shard_mib) << 20,
        keep_work=args.keep_work,
        env=env,
    )
    if args.input is not None:
        try:
            return settings, args.input.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read the job input {args.input}: {exc.strerror}") from None
    return settings, env.get("QMODEL_JOB_INPUT")


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result_path = Path(env.get("QMODEL_RESULT_PATH") or DEFAULT_RESULT)
    try:
        settings, text = parse_settings(argv, env)
        result_path = settings.result_path
        if not text:
            raise InputError("no job input: pass --input PATH or set QMODEL_JOB_INPUT to the JSON document")
        job = parse_input(text)
        result = run(job, settings)
    except InputError as exc:
        return _fail(result_path, f"invalid input: {exc}", EXIT_BAD_INPUT)
    except (JobFailed, StorageError, streaming.ModelError, HessianError, FileNotFoundError) as exc:
        return _fail(result_path, str(exc), EXIT_FAILED)
    except torch.cuda.OutOfMemoryError as exc:
        return _fail(
            result_path, f"out of GPU memory ({exc}); lower the batch size or use a larger GPU", EXIT_FAILED
        )
    except Exception as exc:  # an internal error: the traceback goes to the log, one line to the operator
        log.exception("quantize job failed")
        return _fail(result_path, f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED)
    report.write_termination(result_path, report.result_json(result))
    log.info("done: %s", report.summary(result))
    return EXIT_OK


def _fail(path: Path, reason: str, code: int) -> int:
    log.error("%s", reason)
    report.write_termination(path, report.one_line(reason))
    return code


def run(job: JobInput, settings: JobSettings) -> dict:
    """The whole job; -> the result document."""
    clock = report.Clock()
    env = settings.env
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with clock.phase("load"):
            transfer.check_dataset(job.quantization.calibration.dataset, env)
            transfer.check_dataset(job.validation.dataset, env)
            transfer.check_artifacts(job.artifacts.uri, env)
            source = transfer.fetch_source(job.source.uri, settings.work_dir, env)
            cfg = job.quantization.to_quant_config()
            info = inspect_model(source, cfg)  # InputError before any heavy work
            tokenizer = load_tokenizer(source)
            calibration, evaluation = _windows(job, tokenizer, settings)
            source_digest = report.folder_digest(source)
        return _quantize_and_publish(
            job, settings, source, info, calibration, evaluation, source_digest, clock
        )
    finally:
        if not settings.keep_work:
            shutil.rmtree(settings.work_dir, ignore_errors=True)


def _windows(job: JobInput, tokenizer, settings: JobSettings) -> tuple[torch.Tensor, torch.Tensor]:
    calib, val = job.quantization.calibration, job.validation
    try:
        text = transfer.dataset_text(calib.dataset, "calibration", settings.work_dir, settings.env)
        ids = data.tokenize(tokenizer, text)
        calibration = data.calibration_windows(ids, calib.samples, calib.sequence_length, calib.seed)
    except ValueError as exc:
        raise JobFailed(f"calibration dataset {calib.dataset}: {exc}") from None
    try:
        text = transfer.dataset_text(val.dataset, "evaluation", settings.work_dir, settings.env)
        need = None if val.max_samples is None else val.max_samples * val.sequence_length
        evaluation = data.token_windows(
            leading_tokens(tokenizer, text, need), val.sequence_length, val.max_samples
        )
    except ValueError as exc:
        raise JobFailed(f"validation dataset {val.dataset}: {exc}") from None
    log.info(
        "calibration: %d windows x %d tokens; validation: %d windows x %d tokens",
        *calibration.shape,
        *evaluation.shape,
    )
    return calibration, evaluation


# Tokens kept beyond the cut when only the start of a text is tokenized: a token near a cut can
# differ from the whole text's (BPE merges across the cut); 256 is far more than any merge spans.
_CUT_MARGIN = 256


def leading_tokens(tokenizer, text: str, need: int | None) -> torch.Tensor:
    """The first ``need`` tokens of ``text`` (all when None), as tokenizing the whole text would
    give them, tokenizing only a prefix cut at a blank line: the evaluation windows are the
    text's first windows, and wiki-vital's 854k tokens take ~20 s to tokenize on 2 cores."""
    chars = 8 * need if need else len(text)  # wiki-vital: ~4.6 characters per token
    while need and chars < len(text):
        cut = text.find("\n\n", chars)
        if cut < 0:
            break
        ids = data.tokenize(tokenizer, text[:cut])
        if ids.numel() >= need + _CUT_MARGIN:
            return ids[:need]
        chars *= 2
    return data.tokenize(tokenizer, text)


def _quantize_and_publish(
    job, settings, source, info: ModelInfo, calibration, evaluation, source_digest, clock
):
    cfg = job.quantization.to_quant_config()
    stage = settings.work_dir / "artifact"
    with clock.phase("evaluate"):
        log.info("phase: baseline perplexity on %s", settings.device)
        baseline = streaming.perplexity(
            streaming.StreamedModel.open(source, settings.device), evaluation, settings.eval_batch, "baseline"
        )
    with clock.phase("quantize"):
        log.info("phase: %s %d-bit quantization of %d layers", cfg.method, cfg.bits, info.layers)
        writer, layers = quantize_checkpoint(
            source,
            stage,
            cfg,
            calibration,
            settings.device,
            settings.calibration_batch,
            settings.max_shard_bytes,
        )
    with clock.phase("evaluate"):
        log.info("phase: perplexity of the written checkpoint")
        quantized_model = open_quantized(stage, settings.device)
        quantized = streaming.perplexity(quantized_model, evaluation, settings.eval_batch, "quantized")
    gate = report.gate(baseline.perplexity, quantized.perplexity, job.validation)
    artifact_uri = report.artifact_uri(job)
    with clock.phase("upload"):
        meta = report.manifest_metadata(job, info, source_digest, baseline, quantized, gate, layers, clock)
        _, digest = writer.write_manifest(meta)
        log.info("phase: upload to %s", artifact_uri)
        uploaded = transfer.publish(stage, artifact_uri, settings.env)
    return report.build_result(
        job, info, baseline, quantized, gate, artifact_uri, uploaded, digest, stage, clock
    )


if __name__ == "__main__":
    raise SystemExit(main())
