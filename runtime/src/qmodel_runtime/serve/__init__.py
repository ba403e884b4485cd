"""The OpenAI-compatible HTTP server: ``python -m qmodel_runtime.serve --artifact URI``."""
