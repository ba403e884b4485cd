"""The estimator's fixed overhead against a real GPU: the CUDA context plus cuBLAS and Triton
workspaces must fit in ``Budget.context_bytes`` (skipped without CUDA)."""

from __future__ import annotations

import pytest

from qmodel_operator.estimator import Budget

pytestmark = pytest.mark.gpu


def test_cuda_context_and_workspaces_fit_the_fixed_overhead():
    torch = pytest.importorskip("torch")
    torch.cuda.init()
    _, total = torch.cuda.mem_get_info()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    (x @ x).sum().item()  # cuBLAS handle and workspace
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    # Everything the driver reports in use that is not the caching allocator's own reservation
    # (on a GPU no other process uses, as on the test machine).
    overhead = (total - free) - torch.cuda.memory_reserved()
    assert 0 < overhead <= Budget().context_bytes, f"{overhead / 2**20:.0f} MiB of context and workspaces"
    # The reservation itself is what the estimator counts as weights, KV cache and workspace.
    assert torch.cuda.memory_reserved() >= x.numel() * 2
