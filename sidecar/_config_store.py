"""The ``store`` section of the sidecar configuration: where incident files and receipts live.

``store.uri`` ``""`` (the default) keeps them under ``<data_dir>/incidents/`` exactly as before;
any other value is a ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///mnt/shared/forensics``) and ``store.s3`` holds the ``pyarrow.fs.S3FileSystem``
options for ``s3://``. Credentials never come from the YAML: only from the standard AWS
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``),
the shared credentials file or an instance/pod role — the AWS SDK's default chain.

Example::

    cfg = parse_store({"uri": "s3://forensics/prod", "s3": {"region": "eu-west-1"}})
    cfg.is_local, cfg.s3.scheme            # (False, 'https')
    fs, base = cfg.filesystem()             # (S3FileSystem, 'forensics/prod')
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from typing import Any

from integrations.errors import ConfigError

__all__ = ["S3Config", "StoreConfig", "parse_store"]

#: URI schemes ``pyarrow.fs.FileSystem.from_uri`` opens (besides an absolute local path).
SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "viewfs", "abfs", "abfss")
#: Keys that would put a credential in the YAML (refused, with where to put it instead).
_SECRET_KEYS = ("access_key", "secret_key", "session_token", "aws_access_key_id",
                "aws_secret_access_key")
#: Connection behaviour of the object store client (seconds; attempts incl. the first).
CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, MAX_ATTEMPTS = 5.0, 60.0, 3


@dataclasses.dataclass(frozen=True)
class S3Config:
    """``pyarrow.fs.S3FileSystem`` options for an ``s3://`` ``store.uri`` (no credentials)."""

    endpoint_override: str = ""   # host:port of an S3-compatible service ("" = AWS)
    region: str = ""              # "" = the SDK's default (AWS_DEFAULT_REGION, ...)
    scheme: str = "https"         # https | http


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where incident files and receipts live (``""``: ``<data_dir>/incidents``)."""

    uri: str = ""
    s3: S3Config = dataclasses.field(default_factory=S3Config)

    @property
    def is_local(self) -> bool:
        """Whether this is the default local layout under ``data_dir``."""
        return self.uri == ""

    def filesystem(self) -> tuple[Any, str]:
        """(``pyarrow.fs.FileSystem``, base path in it without a trailing slash) of ``uri``."""
        import pyarrow.fs as pafs

        parts = urllib.parse.urlsplit(self.uri)
        if parts.scheme == "s3":
            kwargs: dict[str, Any] = {
                "scheme": self.s3.scheme, "connect_timeout": CONNECT_TIMEOUT_S,
                "request_timeout": REQUEST_TIMEOUT_S,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS)}
            if self.s3.endpoint_override:
                kwargs["endpoint_override"] = self.s3.endpoint_override
            if self.s3.region:
                kwargs["region"] = self.s3.region
            base = f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
            return pafs.S3FileSystem(**kwargs), base
        fs, base = pafs.FileSystem.from_uri(self.uri)
        return fs, base.rstrip("/")


def _check_uri(uri: Any) -> str:
    if not isinstance(uri, str):
        raise ConfigError(f"store.uri must be a string, got {uri!r}")
    if uri == "":
        return uri
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme:
        if not uri.startswith("/"):
            raise ConfigError(f"store.uri {uri!r} must be \"\" (files under data_dir), an "
                              "absolute path or a URI such as s3://bucket/prefix")
        return uri
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"store.uri scheme {parts.scheme!r} is not one of "
                          f"{', '.join(SCHEMES)}")
    if parts.scheme in ("s3", "gs", "gcs") and not parts.netloc:
        raise ConfigError(f"store.uri {uri!r} names no bucket; write {parts.scheme}://"
                          "bucket/prefix")
    if parts.query or parts.username or parts.password:
        raise ConfigError("store.uri must not carry options or credentials; put options in "
                          "store.s3 and credentials in the AWS environment variables")
    return uri


def _s3(value: Any) -> S3Config:
    if value is None:
        return S3Config()
    if not isinstance(value, Mapping):
        raise ConfigError(f"store.s3 must be a mapping, got {type(value).__name__}")
    secrets = sorted(set(value) & set(_SECRET_KEYS))
    if secrets:
        raise ConfigError(f"store.s3.{secrets[0]}: credentials never go in the config; set "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or use an instance role)")
    fields = {f.name for f in dataclasses.fields(S3Config)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join('store.s3.' + k for k in unknown)}"
                          f"; valid: {', '.join(sorted('store.s3.' + k for k in fields))}")
    for key, val in value.items():
        if not isinstance(val, str):
            raise ConfigError(f"store.s3.{key} must be a string, got {val!r}")
    cfg = S3Config(**value)
    if cfg.scheme not in ("https", "http"):
        raise ConfigError(f"store.s3.scheme must be 'https' or 'http', got {cfg.scheme!r}")
    return cfg


def parse_store(value: Any) -> StoreConfig:
    """The ``store`` section from its raw YAML mapping (:class:`ConfigError` names a bad key).

    Example::

        parse_store(None).is_local          # True
    """
    if value is None:
        return StoreConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"store must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - {"uri", "s3"})
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join('store.' + k for k in unknown)}; "
                          "valid: store.s3, store.uri")
    return StoreConfig(uri=_check_uri(value.get("uri", "")), s3=_s3(value.get("s3")))
