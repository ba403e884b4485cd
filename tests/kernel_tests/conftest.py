"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernel modules (gemv, gemm, splitk) are imported,
because ``@triton.jit`` decides at decoration time. Nothing imports them before this file
(``qmodel_kernels`` itself defers them to the first kernel call), and ``interpreted``
below fails loudly if something did.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_tests.helpers import DEVICE


@pytest.fixture(scope="session")
def kernels():
    """The kernel modules, checked to run compiled on a GPU or interpreted on the CPU."""
    from qmodel_kernels import gemm, gemv, splitk
    from qmodel_kernels.quant_weight import interpreting

    if DEVICE == "cpu":
        import numpy as np
        import triton

        def version(text):
            return tuple(int(p) for p in text.split(".")[:2])

        if version(np.__version__) >= (2, 4) and version(triton.__version__) < (3, 7):
            pytest.fail(
                "Triton 3.6's interpreter fails with numpy >= 2.4 (triton-lang/triton#9171): "
                "pip install 'numpy<2.4'",
                pytrace=False,
            )
        for kernel in (gemv._gemv_kernel, gemm._gemm_kernel, splitk._splitk_reduce_kernel):
            if not interpreting(kernel):
                pytest.fail(
                    "the Triton kernels were imported before TRITON_INTERPRET=1 was set; run the "
                    "kernel tests on their own or export TRITON_INTERPRET=1",
                    pytrace=False,
                )
    return gemv, gemm, splitk


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor torch.empty makes while a kernel runs starts as NaN: an output
    element (or split-K partial) that the kernels never write shows up as NaN."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
