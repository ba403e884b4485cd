"""Batch Jobs the operator launches from the runtime image (``python -m qmodel_runtime.jobs.quantize``)."""
