"""The entry point: y = x @ dequant(W) + bias for any leading dims, on the right kernel.

M = rows of x after flattening the leading dims. M > 8 runs the tensor-core GEMM
(gemm.py); M <= 8 (decode) the split-K GEMV (gemv.py) or, where the tuner measured it
faster on this GPU, the GEMM. On a GPU the launch config comes from the per-device tuner
(tuning.py); in Triton's CPU interpreter (tests) big tiles keep its per-op cost down.
"""

from __future__ import annotations

import torch
import triton

from qmodel_kernels import gemm as gemm_mod
from qmodel_kernels import gemv as gemv_mod
from qmodel_kernels.quant_weight import QuantWeight
from qmodel_kernels.tuning import Tuner, default_tuner, m_bucket

PATHS = ("auto", "gemv", "gemm")


def choose_path(m: int) -> str:
    return "gemv" if m <= gemv_mod.MAX_M else "gemm"


def tuning_key(path: str, m: int, w: QuantWeight, dtype: torch.dtype) -> str:
    act = "perm" if w.perm is not None else "gidx" if w.g_idx is not None else "plain"
    return f"{path}|M{m_bucket(m)}|N{w.out_features}|K{w.in_features}|b{w.bits}|g{w.group_size}|{act}|{dtype}"


def quant_matmul(
    x: torch.Tensor,
    w: QuantWeight,
    bias: torch.Tensor | None = None,
    *,
    path: str = "auto",
    tuner: Tuner | None = None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16) -> [..., N] in x's dtype."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim; the layer expects {w.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, w.out_features)
    config = _config(path, x2, w, bias, tuner)
    return _run(config, x2, w, bias).view(*lead, w.out_features)


def _run(config, x, w, bias):
    """The kernel a config belongs to: GemvConfig -> gemv, GemmConfig -> gemm."""
    kernel = gemv_mod.gemv if isinstance(config, gemv_mod.GemvConfig) else gemm_mod.gemm
    return kernel(x, w, bias, config)


def interpreter_config(path: str, m: int, n: int, k: int, bits: int):
    """Big tiles for Triton's CPU interpreter, whose cost is per executed op, not per element:
    a 576x576 layer at M=8 took 1.9 s with these and 26 s with 64x64 tiles (2 busy cores)."""
    block_n = min(256, triton.next_power_of_2(n))
    if path == "gemv":
        rows = max(1, 65536 // (gemv_mod.block_m_for(m) * block_n))  # [BLOCK_M, ROWS, BLOCK_N]: 64k
        return gemv_mod.GemvConfig(block_n, min(triton.next_power_of_2(k), rows * 32 // bits))
    return gemm_mod.GemmConfig(min(128, max(16, triton.next_power_of_2(m))), block_n, 128)


def _config(path: str, x: torch.Tensor, w: QuantWeight, bias, tuner: Tuner | None):
    """The launch config: tuned per GPU. For M <= 8 ("auto") GEMV and GEMM candidates are
    timed together, since where tensor cores start to win depends on the GPU and shape."""
    m, n, k = x.shape[0], w.out_features, w.in_features
    path = choose_path(m) if path == "auto" and m > gemv_mod.MAX_M else path
    if x.device.type != "cuda":
        return interpreter_config(choose_path(m) if path == "auto" else path, m, n, k, w.bits)
    sm = torch.cuda.get_device_properties(x.device).multi_processor_count
    candidates = []
    if path in ("auto", "gemv"):
        candidates += gemv_mod.gemv_configs(m, n, k, w.bits, sm)
    if path in ("auto", "gemm"):
        candidates += gemm_mod.gemm_configs(m, n, k, sm)
    if path == "gemm":
        default = gemm_mod.default_gemm_config(m, n, k, sm)
    else:
        default = gemv_mod.default_gemv_config(m, n, k, w.bits, sm)
    tuner = tuner or default_tuner(x.device)
    return tuner.choose(
        tuning_key(path, m, w, x.dtype), candidates, default, lambda cfg: _run(cfg, x, w, bias)
    )
