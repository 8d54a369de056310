"""Bearer-token authentication: tokens map to tenants, compared in constant time.

The :class:`AuthInterceptor` rejects unauthenticated calls to ``forensics.v1.IncidentService``
before any request message is read (health checks and reflection stay open, for probes and
tools). The servicer asks :meth:`Authenticator.principal` who is calling to scope every read and
delete to that tenant. With no tokens configured auth is off: every caller is an admin.

Incident ids are unique per tenant, so an admin (who sees every tenant) may name the tenant a
call is about with the metadata ``x-forensics-tenant: <tenant>`` (:data:`TENANT_METADATA`);
the call is then scoped to that tenant exactly as a tenant token is. A tenant token may send
its own tenant there; naming another is refused (:class:`TenantNotPermittedError`).

Example::

    auth = Authenticator(AuthConfig(tokens={"s3cret-token": "acme"}))
    auth.resolve("Bearer s3cret-token")      # Principal(tenant='acme', admin=False)
    metadata = [("authorization", "Bearer s3cret-token")]   # what clients send
    admin_on_acme = [("authorization", "Bearer <admin token>"), ("x-forensics-tenant", "acme")]
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from typing import Any

import grpc

from integrations.errors import SidecarError

from ._config_sections import AuthConfig
from ._observer import Telemetry, as_telemetry
from ._reject import count_rejection

__all__ = ["ANONYMOUS_ADMIN", "TENANT_METADATA", "AuthInterceptor", "Authenticator", "Principal",
           "TenantNotPermittedError"]

PROTECTED_PREFIX = "/forensics.v1."
#: Metadata key naming the tenant a call is about (admins; a tenant token only its own).
TENANT_METADATA = "x-forensics-tenant"


class TenantNotPermittedError(SidecarError):
    """A tenant token named another tenant in :data:`TENANT_METADATA`."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: ``tenant`` (an admin's is None unless the call names one) and whether
    they may see every tenant."""

    tenant: str | None
    admin: bool

    def scope(self) -> str | None:
        """The tenant to restrict queries to (``None`` = all tenants: an admin who named
        none)."""
        return self.tenant


ANONYMOUS_ADMIN = Principal(tenant=None, admin=True)


class Authenticator:
    """Resolves ``authorization`` metadata to a :class:`Principal`."""

    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        self._tokens = [(t.encode("utf-8"), tenant) for t, tenant in config.tokens.items()]
        self._admin = [t.encode("utf-8") for t in config.admin_tokens]

    def resolve(self, header: str | None) -> Principal | None:
        """The principal for an ``authorization`` header value, ``None`` if not valid.

        Every configured token is compared (``hmac.compare_digest``) so timing does not reveal
        which token, or how much of one, matched.
        """
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer "):].strip().encode("utf-8")
        found: Principal | None = None
        for token in self._admin:
            if hmac.compare_digest(given, token):
                found = ANONYMOUS_ADMIN
        for token, tenant in self._tokens:
            if hmac.compare_digest(given, token) and found is None:
                found = Principal(tenant=tenant, admin=False)
        return found

    def principal(self, context: grpc.ServicerContext) -> Principal | None:
        """The principal of a call (from its invocation metadata), scoped to the tenant the
        call names in :data:`TENANT_METADATA` (:class:`TenantNotPermittedError` when a tenant
        token names another tenant)."""
        metadata = context.invocation_metadata()
        found = self.resolve(_header(metadata))
        named = _header(metadata, TENANT_METADATA)
        if found is None or named is None:
            return found
        if found.admin:
            return Principal(tenant=named, admin=True)
        if named != found.tenant:
            raise TenantNotPermittedError(
                f"metadata {TENANT_METADATA!r} names another tenant than this token's; a tenant "
                "token acts on its own tenant only — leave it out")
        return found


def _header(metadata: Any, name: str = "authorization") -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _deny(message: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return abort


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects IncidentService calls without a valid bearer token (UNAUTHENTICATED)."""

    def __init__(self, auth: Authenticator, *, telemetry: Telemetry | None = None) -> None:
        self._auth = auth
        self._telemetry = as_telemetry(telemetry)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if not self._auth.enabled or not method.startswith(PROTECTED_PREFIX):
            return continuation(handler_call_details)
        header = _header(handler_call_details.invocation_metadata)
        if self._auth.resolve(header) is not None:
            return continuation(handler_call_details)
        count_rejection(self._telemetry, "unauthenticated")
        msg = ("missing bearer token: send metadata 'authorization: Bearer <token>'"
               if header is None else "invalid bearer token; check the token configured for "
               "this client against the sidecar's auth.tokens")
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny(msg))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny(msg))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny(msg))
        return grpc.unary_unary_rpc_method_handler(_deny(msg))
