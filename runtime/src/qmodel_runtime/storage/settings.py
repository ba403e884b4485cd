"""Storage settings, parsed once from the environment into frozen values and passed explicitly.

The variables are the usual AWS names, which a Kubernetes Secret provides to the pod:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``. With a ``prefix``
(the quantize Job reads its *source* with ``QMODEL_SOURCE_``) the prefixed set is used alone
as soon as any prefixed variable is present, so a source's and an artifact's credentials are
never mixed; when none is present the plain variables apply (one Secret for both).

qmodel's own knobs: ``QMODEL_S3_ADDRESSING_STYLE`` (path | virtual | auto; default path when an
endpoint is set, as local S3-compatible servers expect), ``QMODEL_STORAGE_PART_MIB``,
``QMODEL_STORAGE_THREADS``, ``QMODEL_STORAGE_RETRIES`` (tries in all), ``QMODEL_PVC_ROOT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from qmodel_runtime.storage.base import TransferSettings
from qmodel_runtime.storage.errors import PermanentStorageError
from qmodel_runtime.storage.retry import RetryPolicy
from qmodel_runtime.storage.uri import DEFAULT_PVC_ROOT

ADDRESSING_STYLES = ("path", "virtual", "auto")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: str = "auto"
    # Connect fails fast (an unreachable endpoint is reported in seconds); reads allow a slow
    # server 60 s per 16 MiB part before the part is retried.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    env_prefix: str = ""

    def __post_init__(self) -> None:
        if self.addressing_style not in ADDRESSING_STYLES:
            raise PermanentStorageError(
                f"QMODEL_S3_ADDRESSING_STYLE must be one of {', '.join(ADDRESSING_STYLES)}; "
                f"got {self.addressing_style!r}"
            )
        if self.endpoint_url is not None:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise PermanentStorageError(
                    f"{self.env_prefix}AWS_ENDPOINT_URL {self.endpoint_url!r} is not an http(s) URL; "
                    "write e.g. https://s3.example.com or http://minio.storage.svc:9000"
                )

    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str = "") -> S3Settings:
        if not prefix or not any(k.startswith(prefix + "AWS_") for k in env):
            prefix = ""

        def get(*names: str) -> str | None:
            for name in names:
                value = env.get(prefix + name, "").strip()
                if value:
                    return value
            return None

        endpoint = get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        style = env.get("QMODEL_S3_ADDRESSING_STYLE", "").strip() or ("path" if endpoint else "auto")
        return cls(
            endpoint_url=endpoint,
            region=get("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=get("AWS_ACCESS_KEY_ID"),
            secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            addressing_style=style,
            env_prefix=prefix,
        )


@dataclass(frozen=True)
class StorageSettings:
    s3: S3Settings = field(default_factory=S3Settings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    pvc_root: Path = DEFAULT_PVC_ROOT

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str = "") -> StorageSettings:
        try:
            transfer = TransferSettings(
                part_size=_int(env, "QMODEL_STORAGE_PART_MIB", TransferSettings.part_size >> 20) << 20,
                threads=_int(env, "QMODEL_STORAGE_THREADS", TransferSettings.threads),
            )
            retry = replace(RetryPolicy(), attempts=_int(env, "QMODEL_STORAGE_RETRIES", RetryPolicy.attempts))
        except ValueError as exc:
            raise PermanentStorageError(f"QMODEL_STORAGE_* settings: {exc}") from None
        return cls(
            s3=S3Settings.from_env(env, prefix),
            transfer=transfer,
            retry=retry,
            pvc_root=Path(env.get("QMODEL_PVC_ROOT", "").strip() or DEFAULT_PVC_ROOT),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise PermanentStorageError(f"{name} must be a whole number, got {text!r}") from None
