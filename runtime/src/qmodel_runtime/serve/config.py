"""Server settings: parsed once from the command line into a frozen object."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_MAX_MODEL_LEN = 4096  # the CRD's serving.maxModelLen default
DEFAULT_GPU_BATCH = 64
DEFAULT_CPU_BATCH = 8


@dataclass(frozen=True)
class ServeConfig:
    artifact: str
    host: str = "0.0.0.0"
    port: int = 8000
    served_model_name: str | None = None
    max_model_len: int | None = None  # default: min(config's max_position_embeddings, 4096)
    max_batch_size: int | None = None  # default: 64 on a GPU (memory permitting), 8 on CPU
    kv_cache_tokens: int | None = None  # default: sized from free GPU memory
    gpu_memory_utilization: float = 0.90
    max_queue: int = 256
    prefill_chunk: int | None = None  # default: 2048 tokens on a GPU, 256 on CPU
    device: str = "auto"
    cuda_graphs: bool = True
    compile: bool = True  # torch.compile the elementwise ops on a GPU
    cache_dir: Path = Path("/tmp/qmodel-artifacts")
    shutdown_grace: float = 30.0
    threads: int | None = None  # torch CPU threads
    log_level: str = "info"
    # On a startup failure: write the reason here and exit 1 (else: stay up, never ready).
    termination_log: Path | None = None

    def model_name(self) -> str:
        """--served-model-name, else the artifact's model folder (<prefix>/<model>/<revision>/)."""
        if self.served_model_name:
            return self.served_model_name
        parts = [p for p in urlparse(self.artifact).path.split("/") if p]
        return parts[-2] if len(parts) >= 2 else (parts[-1] if parts else "model")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qmodel_runtime.serve", description="OpenAI-compatible server for a qmodel artifact."
    )
    p.add_argument("--artifact", required=True, help="artifact URI: s3://..., file:///... or a local folder")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", help="the `model` clients send (default: the artifact's model folder)"
    )
    p.add_argument("--max-model-len", type=_positive(int), help="context length per request (tokens)")
    p.add_argument(
        "--max-batch-size", type=_positive(int), help="most requests decoded at once (KV-cache slots)"
    )
    p.add_argument(
        "--kv-cache-tokens", type=_positive(int), help="KV-cache size in tokens (default: from memory)"
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=0.90,
        help="share of the GPU's memory this server may use (weights + cache + workspace)",
    )
    p.add_argument("--max-queue", type=_positive(int), default=256, help="waiting requests before 429")
    p.add_argument("--prefill-chunk", type=_positive(int), help="prompt tokens per prefill step")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run the decode step eagerly on the GPU (debugging)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("/tmp/qmodel-artifacts"),
        help="where artifacts from object storage are downloaded",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run after SIGTERM before they are cut off",
    )
    p.add_argument("--threads", type=_positive(int), help="CPU threads for torch")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--termination-log",
        type=Path,
        help="on a startup failure (e.g. an artifact that fails verification) write the reason here "
        "and exit 1, so Kubernetes shows it as the container's last state (/dev/termination-log); "
        "without it the server stays up and never ready",
    )
    return p


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    return ServeConfig(**vars(build_parser().parse_args(argv)))
