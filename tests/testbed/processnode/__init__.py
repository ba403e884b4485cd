"""The process node: a minimal stand-in for the kubelet, for tests and the demo only.

It registers a Node, watches the pods the scheduler binds to it and runs each container's
command and args as a local process, with its env (literal, Secret/ConfigMap/downward API
values, envFrom) and its volumes (emptyDir, configMap, secret, projected, downwardAPI,
hostPath) as host folders. Container images are ignored: the project's virtualenv is the
image (its bin dir is first on PATH, so ``python`` is the venv's).

Where the machine allows it (root, mount namespaces: ``isolation="mount"``), each pod gets
a private mount namespace with an overlay of the host's root, its volumes bound at their
``mountPath`` and its termination-message file at ``terminationMessagePath``: commands use
the paths of the manifest unchanged, and whatever a pod writes outside its volumes stays
private to it, as in a container. Elsewhere (``isolation="none"``), the pod runs on the host
file system and every argument or env value starting with a mount path is rewritten to the
volume's host folder (paths hard-coded inside a program are then not redirected).

Each pod gets its own loopback address (127.x.y.z) as pod IP, in ``status.podIP`` and in
the env as ``POD_IP``; a server in the pod must bind it (or 0.0.0.0). There is no network
namespace, no kube-proxy, no Service routing: traffic stays on loopback. Reported through
the status subresource: phase, conditions, pod IP, readiness (httpGet/tcpSocket/exec
probes; liveness and startup probes restart the container), container states with exit
code, reason and termination message, restarts per restartPolicy. On deletion the pod's
process groups get SIGTERM, then SIGKILL after the grace period. Not done: kubectl
logs/exec/port-forward (container output is in files under the node's work dir), resource
limits and cgroups, image pulls, PVCs, host ports, network namespaces.
"""
