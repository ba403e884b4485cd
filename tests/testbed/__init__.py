"""A real local Kubernetes for tests and the demo, without Docker.

The control plane is the real one (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler built from their Go modules by ``install.sh``); GPU nodes are simulated by
KWOK (``nodes``, ``kwok``); one or more *process nodes* (``processnode``) run their pods as
local processes, standing in for the kubelet. ``cluster.start()`` brings it all up,
``pytest_plugin`` holds the fixtures, ``python -m testbed up|down|status`` is the command for people.
"""
