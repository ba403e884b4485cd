"""The persistent tuning cache: chosen once per (GPU model, shape bucket), then read from disk.

GPU timing cannot run here, so ``measure`` is a stand-in that calls the candidate once
and returns a made-up time (a mock for the one thing no CPU test can reach); everything
else (choosing, the file, its keys, merging, stale and broken entries) is the real code.
"""

from __future__ import annotations

import json

import pytest
from triton.runtime.errors import OutOfResources

from qmodel_kernels.gemm import GemmConfig
from qmodel_kernels.gemv import GemvConfig
from qmodel_kernels.tuning import Tuner, TuningSettings, cache_file, m_bucket

CANDIDATES = [GemvConfig(32, 256, 4), GemvConfig(64, 128, 2), GemvConfig(128, 64, 1)]
DEFAULT = GemvConfig(64, 256, 1)
GPU = "NVIDIA H100 80GB HBM3 sm90"


class FakeClock:
    """Runs each candidate once (as do_bench would) and says block_n=64 is fastest, then 16."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        fn()
        return {16: 0.5, 32: 3.0, 64: 1.0, 128: 2.0}[fn.__defaults__[0].block_n]


def _tuner(tmp_path, device=GPU, enabled=True):
    clock = FakeClock()
    return Tuner(TuningSettings(cache_dir=tmp_path, enabled=enabled), device, measure=clock), clock


def test_choice_is_timed_once_and_persisted(tmp_path):
    tuner, clock = _tuner(tmp_path)
    ran = []
    assert tuner.choose("gemv|M1|N4096|K4096", CANDIDATES, DEFAULT, ran.append) == CANDIDATES[1]
    assert clock.calls == 3 and ran == CANDIDATES
    assert tuner.choose("gemv|M1|N4096|K4096", CANDIDATES, DEFAULT, ran.append) == CANDIDATES[1]
    assert clock.calls == 3  # remembered in the process
    data = json.loads(cache_file(tmp_path, GPU).read_text())
    assert data["device"] == GPU and data["configs"]["gemv|M1|N4096|K4096"]["block_n"] == 64
    # a new process on the same machine reads the file and times nothing
    again, clock2 = _tuner(tmp_path)
    assert again.choose("gemv|M1|N4096|K4096", CANDIDATES, DEFAULT, ran.append) == CANDIDATES[1]
    assert clock2.calls == 0


def test_cache_is_per_gpu_model_and_merges_keys(tmp_path):
    h100, _ = _tuner(tmp_path)
    a100, a100_clock = _tuner(tmp_path, device="NVIDIA A100-SXM4-80GB sm80")
    h100.choose("k1", CANDIDATES, DEFAULT, lambda c: None)
    a100.choose("k1", CANDIDATES, DEFAULT, lambda c: None)
    assert a100_clock.calls == 3  # another GPU model is tuned on its own
    assert cache_file(tmp_path, GPU) != cache_file(tmp_path, a100.device)
    assert "H100-80GB-HBM3-sm90--triton-" in cache_file(tmp_path, GPU).name
    other_process, _ = _tuner(tmp_path)
    other_process.choose("k2", CANDIDATES, DEFAULT, lambda c: None)
    h100.choose("k3", CANDIDATES, DEFAULT, lambda c: None)  # writes after k2 landed on disk
    assert set(json.loads(cache_file(tmp_path, GPU).read_text())["configs"]) == {"k1", "k2", "k3"}


def test_mixed_candidate_kinds_come_back_as_their_class(tmp_path):
    """For M <= 8 GEMV and GEMM configs compete; the file says which kind won."""
    tuner, _ = _tuner(tmp_path)
    gemm = GemmConfig(16, 16, 64, 2)  # block_n 16: the fake clock's fastest
    assert tuner.choose("auto|M4", [*CANDIDATES, gemm], DEFAULT, lambda c: None) == gemm
    assert json.loads(cache_file(tmp_path, GPU).read_text())["configs"]["auto|M4"]["kind"] == "GemmConfig"
    again, clock = _tuner(tmp_path)
    got = again.choose("auto|M4", [*CANDIDATES, gemm], DEFAULT, lambda c: None)
    assert isinstance(got, GemmConfig) and got == gemm and clock.calls == 0


def test_disabled_uses_default_and_writes_nothing(tmp_path):
    tuner, clock = _tuner(tmp_path, enabled=False)
    assert tuner.choose("k", CANDIDATES, DEFAULT, lambda c: None) == DEFAULT
    assert clock.calls == 0 and not any(tmp_path.iterdir())


def test_failing_candidates_are_skipped(tmp_path):
    tuner, _ = _tuner(tmp_path)

    def run(cfg):
        if cfg.block_n == 64:  # the would-be winner needs more shared memory than the GPU has
            raise OutOfResources(232448, 166912, "shared memory")

    assert tuner.choose("k", CANDIDATES, DEFAULT, run) == CANDIDATES[2]

    def never(cfg):
        raise RuntimeError("no kernel image is available")

    assert tuner.choose("k-none", CANDIDATES, DEFAULT, never) == DEFAULT


def test_broken_or_stale_entries_are_retuned(tmp_path, caplog):
    path = cache_file(tmp_path, GPU)
    path.write_text("{not json")
    tuner, clock = _tuner(tmp_path)
    assert tuner.choose("k", CANDIDATES, DEFAULT, lambda c: None) == CANDIDATES[1] and clock.calls == 3
    data = json.loads(path.read_text())
    data["configs"]["k"] = {"kind": "GemvConfig", "block_n": 64, "tile": 9}  # another version of the code
    path.write_text(json.dumps(data))
    stale, clock = _tuner(tmp_path)
    assert stale.choose("k", CANDIDATES, DEFAULT, lambda c: None) == CANDIDATES[1] and clock.calls == 3
    assert "stale tuning entry" in caplog.text


def test_settings_from_env(tmp_path):
    s = TuningSettings.from_env({"QMODEL_CACHE": str(tmp_path)})
    assert s.cache_dir == tmp_path / "kernels" and s.enabled
    s = TuningSettings.from_env({"QMODEL_KERNELS_CACHE": "/x/y", "QMODEL_KERNELS_TUNE": "0"})
    assert str(s.cache_dir) == "/x/y" and not s.enabled


@pytest.mark.parametrize(("m", "bucket"), [(1, 1), (3, 4), (8, 8), (9, 16), (33, 64), (5000, 4096)])
def test_m_bucket(m, bucket):
    assert m_bucket(m) == bucket
