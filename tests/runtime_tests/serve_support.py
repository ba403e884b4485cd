"""Shared helpers for the runtime server tests: small artifacts and a server subprocess.

Artifacts are built once per session (``functools.cache``: this module is imported once, so
every test module that asks gets the same folder):
- ``int4_smollm2``: the bundled SmolLM2-135M, round-to-nearest 4-bit, group 64, asymmetric,
  packed through ``qmodel_kernels.layout`` as GPTQ v1, with a manifest: what the quantize Job
  writes, minus the GPTQ error feedback.
- ``tiny_int4``: a 2-layer random Llama with SmolLM2's tokenizer (vocab 49152, dim 64): loads
  in a second, decodes in ~2 ms a token, for the tests that need many requests or a restart.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

from qmodel_kernels import layout
from qmodel_runtime import assets, manifest
from qmodel_runtime.quantizer import QuantConfig, rtn

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)
_ROOT = Path(tempfile.mkdtemp(prefix="qmodel-serve-tests-"))  # server logs, tampered copies
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def rtn_pack(weight: torch.Tensor, bits: int, group_size: int) -> layout.PackedWeight:
    """The quantizer's round-to-nearest mode (asymmetric), packed; weight is nn.Linear's [N, K]."""
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=False, method="rtn")
    return rtn(weight.float(), cfg).pack()


def quantize_folder(
    src: Path, out: Path, bits: int = 4, group_size: int = 64, skip: tuple[str, ...] = ()
) -> Path:
    """An artifact from a plain HF folder: every decoder Linear packed (except names in ``skip``)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(src / "model.safetensors")
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.split(".", 3)[-1] in LINEARS and prefix not in skip:
            packed.update(rtn_pack(tensor, bits, group_size).tensors(prefix))
        else:
            packed[name] = tensor.half() if tensor.is_floating_point() else tensor
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
    }
    config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    manifest.write_manifest(out, {"producer": "tests (RTN)", "quantization": config["quantization_config"]})
    return out


# Bump when the artifacts built here change: they are cached across sessions under
# $QMODEL_CACHE/test-artifacts (building SmolLM2's takes ~1-3 minutes on 2 busy cores).
ARTIFACT_VERSION = "v1"


def _cached(name: str, build) -> Path:
    """``build(folder)`` once per machine into the cache; atomic, so a half-built one is never used."""
    root = assets.cache_root() / "test-artifacts" / ARTIFACT_VERSION
    # <model>/<revision>: the server names the model after the parent folder
    final = root / name / "r-test"
    if (final / manifest.MANIFEST_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.cache
def int4_smollm2() -> Path:
    """SmolLM2-135M, 4-bit RTN, group 64, asymmetric."""
    src = assets.model_path("smollm2-135m", "float32")
    return _cached("smollm2", lambda out: quantize_folder(src, out))


@functools.cache
def tiny_int4() -> Path:
    """A random 2-layer Llama that speaks SmolLM2's vocabulary (4-bit RTN, group 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(out: Path) -> None:
        src = out.parent / f".{out.name}-src"
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        LlamaForCausalLM(cfg).save_pretrained(src)
        smol = assets.model_path("smollm2-135m", "float32")
        for name in TOKENIZER_FILES:
            if (smol / name).is_file():
                shutil.copy(smol / name, src / name)
        quantize_folder(src, out, group_size=32)
        shutil.rmtree(src)

    return _cached("tiny", build)


def copy_artifact(src: Path, name: str) -> Path:
    """A private copy (for tests that tamper with files): <tmp>/<name>/r-copy."""
    dst = _ROOT / name / "r-copy"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- a server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """The value of one unlabeled-but-for-model_name series in /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name} not in /metrics")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _ready_or_exit(server: Server):
    if server.proc.poll() is not None:
        raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_text()[-3000:]}")
    try:
        return httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start_server(artifact: Path, *args: str, wait_ready: bool = True, timeout: float = 300) -> Server:
    port = free_port()
    log = _ROOT / f"server-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "qmodel_runtime.serve",
        "--artifact",
        str(artifact),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        if wait_ready:
            wait_until(lambda: _ready_or_exit(server), timeout, "the server to become ready", interval=0.2)
        else:
            wait_until(lambda: _live(server), timeout, "the server to answer /health/live", interval=0.2)
    except BaseException:
        stop_server(server)
        raise
    return server


def _live(server: Server) -> bool:
    if server.proc.poll() is not None:
        raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_text()[-3000:]}")
    try:
        return httpx.get(f"{server.url}/health/live", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop_server(server: Server, timeout: float = 60) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    return server.proc.returncode


@contextlib.contextmanager
def running_server(artifact: Path, *args: str, **kwargs):
    server = start_server(artifact, *args, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)
