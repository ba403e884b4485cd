"""Pure functions from a pod manifest (a dict, as the API returns it) to what a process needs.

Nothing here talks to the API or starts anything: Secrets and ConfigMaps come in through a
``lookup(kind, name)`` function returning the object (dict) or None.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Lookup = Callable[[str, str], "dict | None"]  # (kind "ConfigMap"|"Secret", name) -> object or None
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ConfigError(Exception):
    """The pod references something that is missing; the kubelet reports CreateContainerConfigError."""


@dataclass(frozen=True)
class Mount:
    source: str  # host path
    target: str  # path inside the pod
    read_only: bool = False


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay as written."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def object_data(kind: str, obj: dict) -> dict[str, bytes]:
    """A ConfigMap's data + binaryData, or a Secret's (base64-decoded) data, as bytes."""
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _ref_data(lookup: Lookup, kind: str, ref: dict) -> dict[str, bytes] | None:
    obj = lookup(kind, ref.get("name", ""))
    if obj is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
    return object_data(kind, obj)


def _key_ref(lookup: Lookup, kind: str, ref: dict) -> str | None:
    data = _ref_data(lookup, kind, ref)
    if data is None:
        return None
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref.get('name')}")
    return data[ref["key"]].decode(errors="replace")


def field_ref(pod: dict, path: str) -> str:
    """The downward API: metadata.name/namespace/uid/labels['k']/annotations['k'], spec.*, status.*IP(s)."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f"unsupported downward API fieldPath {path!r}")
    return simple[path]


_SUFFIX = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(text).strip())
    if not m:
        raise ConfigError(f"cannot read quantity {text!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2) or ""]


def resource_ref(container: dict, ref: dict) -> str:
    """resourceFieldRef (e.g. limits.cpu): the value in divisor units, rounded up as the kubelet does."""
    kind, _, name = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if value is None:
        return "0"
    return str(math.ceil(quantity(value) / quantity(ref.get("divisor") or "1")))


def resolve_env(pod: dict, container: dict, lookup: Lookup, base: dict[str, str]) -> dict[str, str]:
    """The container's environment on top of ``base`` (the "image" env): envFrom, then env, in order."""
    env = dict(base)
    for src in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        )
        data = _ref_data(lookup, kind, ref) or {}
        env.update({src.get("prefix", "") + k: v.decode(errors="replace") for k, v in data.items()})
    for var in container.get("env") or []:
        value = _env_value(pod, container, lookup, var, env)
        if value is not None:
            env[var["name"]] = value
    return env


def _env_value(pod: dict, container: dict, lookup: Lookup, var: dict, env: dict[str, str]) -> str | None:
    if "valueFrom" not in var:
        return expand(var.get("value", ""), env)
    src = var["valueFrom"]
    if "secretKeyRef" in src:
        return _key_ref(lookup, "Secret", src["secretKeyRef"])
    if "configMapKeyRef" in src:
        return _key_ref(lookup, "ConfigMap", src["configMapKeyRef"])
    if "fieldRef" in src:
        return field_ref(pod, src["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in src:
        return resource_ref(container, src["resourceFieldRef"])
    raise ConfigError(f"env {var['name']}: unsupported valueFrom {sorted(src)}")


def command_line(container: dict, env: dict[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; a container without a command has no image to supply one."""
    argv = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not container.get("command"):
        raise ConfigError(
            f"container {container['name']!r} has no command: the process node ignores images, "
            "so it cannot use an image's entrypoint; set command (and args) in the pod spec"
        )
    return argv


def _items(data: dict[str, bytes], items: list[dict] | None, what: str) -> dict[str, bytes]:
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] not in data:
            raise ConfigError(f"{what}: key {item['key']!r} not found")
        out[item["path"]] = data[item["key"]]
    return out


def volume_files(pod: dict, volume: dict, lookup: Lookup, token: Callable[[dict], str]) -> dict[str, bytes]:
    """The files of a configMap/secret/downwardAPI/projected volume (relative path -> content)."""
    if "configMap" in volume or "secret" in volume:
        kind, src = (
            ("ConfigMap", volume["configMap"]) if "configMap" in volume else ("Secret", volume["secret"])
        )
        ref = {"name": src.get("name") or src.get("secretName"), "optional": src.get("optional")}
        data = _ref_data(lookup, kind, ref)
        return {} if data is None else _items(data, src.get("items"), f"{kind} {ref['name']}")
    if "downwardAPI" in volume:
        return {
            i["path"]: field_ref(pod, i["fieldRef"]["fieldPath"]).encode()
            for i in volume["downwardAPI"].get("items") or []
            if "fieldRef" in i
        }
    files: dict[str, bytes] = {}
    for src in volume["projected"].get("sources") or []:
        if "serviceAccountToken" in src:
            files[src["serviceAccountToken"]["path"]] = token(src["serviceAccountToken"]).encode()
        else:
            files.update(volume_files(pod, src, lookup, token))
    return files


def mounts(container: dict, volume_dirs: dict[str, str]) -> list[Mount]:
    """The container's volumeMounts as host-path -> pod-path binds (subPath included)."""
    out = []
    for vm in container.get("volumeMounts") or []:
        if vm["name"] not in volume_dirs:
            raise ConfigError(f"volumeMount {vm['name']!r} names no volume of the pod")
        source = volume_dirs[vm["name"]]
        if vm.get("subPath"):
            source = f"{source.rstrip('/')}/{vm['subPath']}"
        out.append(Mount(source=source, target=vm["mountPath"], read_only=bool(vm.get("readOnly"))))
    return out


def image_binds(binds: list[Mount], image_dirs: Iterable[str]) -> list[Mount]:
    """The image's folders that one of ``binds`` would hide, bound back on top of it read-only."""
    hidden = sorted((d for d in image_dirs if any(_under(d, b.target) for b in binds)), key=len)
    return [Mount(source=d, target=d, read_only=True) for d in hidden]


def _under(path: str, mount_path: str) -> bool:
    base = mount_path.rstrip("/")
    return path == base or path.startswith(base + "/")


def rewrite(value: str, binds: list[Mount]) -> str:
    """Without mount namespaces: a value naming a path under a mount path, moved to its host folder."""
    for b in sorted(binds, key=lambda b: -len(b.target)):
        if _under(value, b.target):
            return b.source + value[len(b.target.rstrip("/")) :]
    return value
