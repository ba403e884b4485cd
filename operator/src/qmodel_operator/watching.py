"""Light list+watch of the children the operator reads (Jobs, Deployments, Services) and GPU nodes.

Each kind is listed once, then watched from the list's resourceVersion (bookmarks keep it
fresh; a watch the server ends resumes from the last version seen; a 410 Gone or an error lists
again, after a pause for errors). Every event is
reduced to a compact summary (``observed``) kept in a ``Store``; the callback hears of it only
when that summary changed, which is all a level-triggered decision can react to (a Job's
``uncountedTerminatedPods`` or a node's heartbeat change nothing).

Why not kopf for these: kopf gives every object a worker task, three loggers, throttling,
cause detection and a handler invocation per event, and an index handler on top. On the
scale benchmark (500 models, about 15 child events each) that was most of the operator's
CPU; a line of JSON decoded into a summary is a small fraction of it. kopf still watches the
QuantizedModels themselves (peering, namespaces, liveness).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp

from qmodel_operator.kube import ApiError, KubeApi

log = logging.getLogger(__name__)
S = TypeVar("S")
# The API server ends a watch after timeoutSeconds; we ask for a new one from the same version.
WATCH_SECONDS = 300
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Kind(Generic[S]):
    """One watched kind: where it lives and how an object becomes ``(group key, summary)``."""

    api_version: str
    plural: str
    selector: str
    # body -> (the key it is filed under, its summary), or None when it is no model's.
    summarize: Callable[[dict[str, Any]], tuple[Any, S] | None]
    namespaced: bool = True

    def path(self, namespace: str | None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        ns = f"/namespaces/{namespace}" if namespace and self.namespaced else ""
        return f"{base}{ns}/{self.plural}"


class Store(Generic[S]):
    """Summaries of one kind, grouped by key (a model's children, or all GPU nodes)."""

    def __init__(self) -> None:
        self._groups: dict[Any, dict[str, S]] = {}
        self._where: dict[str, Any] = {}  # uid -> key
        self.synced = asyncio.Event()  # set once the first list of every scope is in

    def get(self, key: Any) -> list[S]:
        return list(self._groups.get(key, {}).values())

    def put(self, uid: str, entry: tuple[Any, S] | None) -> set[Any]:
        """File (or drop, for None) one object; returns the keys whose summaries changed."""
        old_key = self._where.get(uid)
        old = self._groups.get(old_key, {}).get(uid) if old_key is not None else None
        if entry is None:
            return self.drop(uid)
        key, summary = entry
        if old_key == key and old == summary:
            return set()
        changed = self.drop(uid) | {key}
        self._groups.setdefault(key, {})[uid] = summary
        self._where[uid] = key
        return changed

    def drop(self, uid: str) -> set[Any]:
        key = self._where.pop(uid, None)
        if key is None:
            return set()
        group = self._groups.get(key, {})
        group.pop(uid, None)
        if not group:
            self._groups.pop(key, None)
        return {key}

    def uids(self, scope: str | None) -> set[str]:
        """The uids filed from one namespace (every one for a cluster-wide scope)."""
        return {uid for uid, key in self._where.items() if scope is None or _namespace_of(key) == scope}


def _namespace_of(key: Any) -> str | None:
    return key[0] if isinstance(key, tuple) and key else None


def _uid(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


async def _list(api: KubeApi, kind: Kind[Any], namespace: str | None) -> tuple[list[dict[str, Any]], str]:
    """Every object of the scope (paged), and the version to watch from."""
    items: list[dict[str, Any]] = []
    params = {"labelSelector": kind.selector, "limit": "500"}
    while True:
        page = await api.request("GET", kind.path(namespace), params=params)
        items += page.get("items") or []
        meta = page.get("metadata") or {}
        if not meta.get("continue"):
            return items, meta.get("resourceVersion", "")
        params = {**params, "continue": meta["continue"]}


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


async def watch_scope(
    api: KubeApi,
    kind: Kind[S],
    store: Store[S],
    namespace: str | None,
    changed: Callable[[set[Any]], None],
    listed: Callable[[], None],
) -> None:
    """List then watch one kind in one namespace (None: cluster-wide) until cancelled."""
    failures = 0
    while True:
        try:
            items, version = await _list(api, kind, namespace)
            stale = store.uids(namespace) - {_uid(i) for i in items}
            keys: set[Any] = set()
            for uid in stale:
                keys |= store.drop(uid)
            for item in items:
                keys |= store.put(_uid(item), kind.summarize(item))
            listed()
            changed(keys)
            while True:
                version = await _watch(api, kind, store, namespace, version, changed)
                failures = 0
        except Gone:
            log.debug("%s watch in %s: version too old, listing again", kind.plural, namespace or "all")
        except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as e:
            failures += 1
            where = namespace or "all namespaces"
            log.warning("%s watch in %s failed (%s); listing again", kind.plural, where, e)
            await _pause(failures)
        except Exception:  # a bug must not end the watch: the operator would go blind to it
            failures += 1
            log.exception("%s watch in %s failed; listing again", kind.plural, namespace or "all namespaces")
            await _pause(failures)


async def _pause(failures: int) -> None:
    await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS)) - 1])


async def _watch(
    api: KubeApi,
    kind: Kind[S],
    store: Store[S],
    namespace: str | None,
    version: str,
    changed: Callable[[set[Any]], None],
) -> str:
    """One watch request from ``version``; returns the version to resume from."""
    params = {
        "watch": "true",
        "allowWatchBookmarks": "true",
        "labelSelector": kind.selector,
        "resourceVersion": version,
        "timeoutSeconds": str(WATCH_SECONDS),
    }
    async for line in api.stream(kind.path(namespace), params=params, seconds=WATCH_SECONDS + 30):
        event = json.loads(line)
        kind_of, obj = event.get("type"), event.get("object") or {}
        if kind_of == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiError(int(obj.get("code") or 500), str(obj.get("message", obj)))
        version = (obj.get("metadata") or {}).get("resourceVersion") or version
        if kind_of == "BOOKMARK":
            continue
        uid = _uid(obj)
        keys = store.drop(uid) if kind_of == "DELETED" else store.put(uid, kind.summarize(obj))
        if keys:
            changed(keys)
    return version


def start(
    api: KubeApi,
    watched: Iterable[tuple[Kind[Any], Store[Any], Callable[[set[Any]], None]]],
    namespaces: tuple[str, ...],
) -> list[asyncio.Task[None]]:
    """One task per kind and namespace (one per kind when cluster-wide or cluster-scoped);
    each store's ``synced`` is set once all of its scopes have listed."""
    tasks = []
    for kind, store, changed in watched:
        scopes: tuple[str | None, ...] = namespaces if namespaces and kind.namespaced else (None,)
        pending = set(scopes)

        def listed(scope: str | None, store: Store[Any] = store, pending: set[Any] = pending) -> None:
            pending.discard(scope)
            if not pending:
                store.synced.set()

        for scope in scopes:
            coro = watch_scope(api, kind, store, scope, changed, lambda s=scope, f=listed: f(s))
            tasks.append(asyncio.get_running_loop().create_task(coro, name=f"watch {kind.plural} {scope}"))
    return tasks
