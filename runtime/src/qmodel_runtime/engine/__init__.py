"""The serving engine: continuous batching over a static, slot-based KV cache.

- ``scheduler``: the waiting queue, slots, prefill chunks and decode batches (bookkeeping only)
- ``runner``: prefill / decode calls into the model, and the decode step's CUDA graphs
- ``sampling``: greedy, temperature, top-k, top-p, seeds
- ``detok``: incremental detokenization and stop strings
- ``memory``: sizing the KV cache from free GPU memory, and the measured memory report
- ``core``: the engine thread tying them together
"""

from qmodel_runtime.engine.core import Engine, EngineConfig, EngineDraining, EngineObserver
from qmodel_runtime.engine.sampling import SamplingParams
from qmodel_runtime.engine.scheduler import QueueFull, RequestOutput

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineDraining",
    "EngineObserver",
    "QueueFull",
    "RequestOutput",
    "SamplingParams",
]
