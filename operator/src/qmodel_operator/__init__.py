"""qmodel's Kubernetes operator: QuantizedModel lifecycle, quality gate, GPU sizing and rollout.

Layout (decisions and builders are pure; I/O lives in two thin modules):

- ``spec``       pydantic models of the CRD's spec and status (tested against crds/ for drift)
- ``revision``   the digest of everything that changes the weights
- ``estimator``  GPU-memory sizing (stdlib only), ``gpu``: GPU classes from node labels
- ``results``    the quantize Job's termination-message result
- ``podspec``, ``jobs``, ``serving``: pure ``build_*() -> dict`` manifest builders
- ``conditions``, ``lifecycle``: the pure decision (observed state -> plan)
- ``kube``       the one API layer (aiohttp; create-if-absent, server-side apply, status)
- ``reconciler`` observe -> decide -> act, one model at a time; ``handlers``: kopf wiring
- ``settings``   environment, parsed once at startup; ``metrics``: Prometheus
"""

__version__ = "0.1.0"
