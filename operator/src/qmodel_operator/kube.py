"""The one Kubernetes API layer: every write the operator makes goes through here.

A small async client on aiohttp (which kopf already uses), authenticated with the same
credentials kopf logs in with. Writes are idempotent by construction:

- ``create`` is create-if-absent (409 means someone, maybe our earlier self, made it);
- ``apply`` is server-side apply with our field manager (create or converge in one call);
- ``delete`` treats 404 as done; ``set_status`` replaces the whole status.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from qmodel_operator import podspec as ps

log = logging.getLogger(__name__)

PLURALS = {
    "Job": "jobs",
    "Deployment": "deployments",
    "Service": "services",
    "Pod": "pods",
    "Event": "events",
    ps.KIND: "quantizedmodels",
}
Login = Callable[[], Awaitable[kopf.ConnectionInfo]]
Observe = Callable[[str, str, float], None]  # (verb, resource, seconds) of each finished call


# Characters a JSON body may carry raw but the API server's YAML reader (server-side apply reads
# the body as YAML) refuses or reads as a line break: C1 controls and DEL, NEL, the line and
# paragraph separators, BOM and the non-characters. Python escapes non-BMP characters as
# surrogate pairs, which that reader refuses too, so the body is written as UTF-8 with these
# few escaped instead.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def encode_body(body: Any) -> bytes:
    """JSON that the API server reads the same as JSON and as YAML, for any text it can hold."""
    text = json.dumps(body, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


class ApiError(Exception):
    """A non-success answer of the API server (status code, message, the causes' reasons)."""

    def __init__(self, status: int, message: str, causes: tuple[str, ...] = ()) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.causes = causes

    @property
    def namespace_terminating(self) -> bool:
        """Nothing new can be created in a namespace being deleted (403, NamespaceTerminating)."""
        return self.status == 403 and "NamespaceTerminating" in self.causes


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{quote(namespace)}" if namespace else ""
    tail = f"/{quote(name)}" if name else ""
    return f"{base}{ns}/{PLURALS[kind]}{tail}"


def resource_of(path: str) -> str:
    """The resource a path names, without namespace or name: ``jobs``, ``quantizedmodels/status``."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts[:-2]:  # .../namespaces/<ns>/<resource>[/<name>[/<sub>]]
        parts = parts[parts.index("namespaces") + 2 :]
    else:  # /api/v1/<resource>... or /apis/<group>/<version>/<resource>...
        parts = parts[2:] if parts[0] == "api" else parts[3:]
    return "/".join(parts[:1] + parts[2:3])


def _error(status: int, reason: str, answer: Any) -> ApiError:
    if not isinstance(answer, dict):
        return ApiError(status, reason)
    causes = tuple(c.get("reason", "") for c in (answer.get("details") or {}).get("causes") or ())
    return ApiError(status, str(answer.get("message", reason)), causes)


def _session(info: kopf.ConnectionInfo, limit: int) -> aiohttp.ClientSession:
    headers = dict(info.as_http_headers())
    headers["User-Agent"] = "qmodel-operator"
    return aiohttp.ClientSession(
        base_url=info.server.rstrip("/") + "/",
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=30),
        read_bufsize=2**20,  # a watch event is one line; aiohttp's 64 KiB default is tight for big objects
    )


class KubeApi:
    """Async access to the API server; re-logs in once on 401 (rotated tokens)."""

    def __init__(self, login: Login, limit: int = 64, observe: Observe | None = None) -> None:
        self._login = login
        self._limit = limit
        self._observe = observe
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _connect(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = _session(await self._login(), self._limit)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; returns the decoded JSON answer, raises ApiError otherwise."""
        started = time.monotonic()
        data = encode_body(body) if body is not None else None
        headers = {"Content-Type": content_type} if body is not None else {}
        for attempt in (1, 2):
            session = await self._connect()
            async with session.request(
                method, path.lstrip("/"), params=params, data=data, headers=headers
            ) as resp:
                if resp.status == 401 and attempt == 1:
                    log.info("the API server refused our credentials; logging in again")
                    await self.close()
                    continue
                answer = await resp.json(content_type=None) if resp.content_length != 0 else None
                elapsed = time.monotonic() - started
                log.debug("%s %s: %d in %.0f ms", method, path, resp.status, elapsed * 1000)
                if self._observe is not None:
                    self._observe(method, resource_of(path), elapsed)
                if resp.status >= 400:
                    raise _error(resp.status, resp.reason or "", answer)
                return answer
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def stream(self, path: str, *, params: Mapping[str, str], seconds: float) -> AsyncIterator[bytes]:
        """A watch: the answer's lines as they arrive, for at most ``seconds``. A 401 drops the
        session, so the caller's next attempt logs in again."""
        session = await self._connect()
        timeout = aiohttp.ClientTimeout(total=seconds)
        async with session.get(path.lstrip("/"), params=params, timeout=timeout) as resp:
            if resp.status >= 400:
                answer = await resp.json(content_type=None) if resp.content_length != 0 else None
                if resp.status == 401:
                    await self.close()
                raise _error(resp.status, resp.reason or "", answer)
            async for line in resp.content:
                if line.strip():
                    yield line

    # --- reads -----------------------------------------------------------------------------

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        path = resource_path(api_version, kind, namespace)
        data = await self.request("GET", path, params={"labelSelector": selector})
        return list(data.get("items") or [])

    # --- writes ----------------------------------------------------------------------------

    async def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create if absent: True when created, False when it existed already."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        try:
            await self.request("POST", path, body=manifest)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager (JSON is valid apply YAML)."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        params = {"fieldManager": ps.FIELD_MANAGER, "force": "true"}
        return await self.request(
            "PATCH", path, params=params, body=manifest, content_type="application/apply-patch+yaml"
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete with background propagation (a Job takes its pods along); 404 is success."""
        path = resource_path(api_version, kind, namespace, name)
        try:
            await self.request("DELETE", path, params={"propagationPolicy": "Background"})
        except ApiError as e:
            if e.status != 404:
                raise

    async def set_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a model's whole status (we are its only writer); returns the updated object."""
        path = resource_path(ps.API_VERSION, ps.KIND, namespace, name) + "/status"
        patch = [{"op": "add", "path": "/status", "value": status}]
        return await self.request("PATCH", path, body=patch, content_type="application/json-patch+json")

    async def set_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> dict[str, Any]:
        """Replace the finalizer list, guarded by resourceVersion (others may own finalizers too)."""
        path = resource_path(ps.API_VERSION, ps.KIND, namespace, name)
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        return await self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    async def post_event(self, ref: ps.ModelRef, kind: str, reason: str, message: str, now: str) -> None:
        """A core/v1 Event on the model, as `kubectl describe qm` shows them."""
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ps.API_VERSION,
                "kind": ps.KIND,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": ps.MANAGED_BY},
            "reportingComponent": f"{ps.GROUP}/operator",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", resource_path("v1", "Event", ref.namespace), body=body)
