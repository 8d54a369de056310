"""ASGI middleware: serve every HTTP request inside ``recorder.request(...)``.

Works with any ASGI framework (Starlette, FastAPI, ...) and needs none of them: it reads the
request id (``x-request-id``, else a new one), the tenant (``x-tenant-id`` by default) and the
W3C ``traceparent`` from the headers, and passes all headers to the triggers (so
``triggers.Header("x-forensics-capture")`` works). Endpoints flag failures with
``integrations.flag("...")``; sync endpoints run in a thread pool that copies the context, so
the flag reaches the right request. Forensics never fails the HTTP request.

Example::

    from starlette.applications import Starlette
    app = Starlette(routes=[...])
    app.add_middleware(ForensicsMiddleware, recorder=rec)      # or ForensicsMiddleware(app, ...)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._recorder import Recorder

__all__ = ["ForensicsMiddleware"]

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class ForensicsMiddleware:
    """Wraps an ASGI app so each HTTP request is a recorder request."""

    def __init__(self, app: _ASGIApp, *, recorder: Recorder,
                 request_id_header: str = "x-request-id",
                 tenant_header: str = "x-tenant-id",
                 response_header: str | None = "x-forensics-request-id") -> None:
        self.app = app
        self.recorder = recorder
        self.request_id_header = request_id_header.lower()
        self.tenant_header = tenant_header.lower()
        self.response_header = response_header.lower() if response_header else None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope.get("headers") or []:
            try:
                headers[k.decode("latin-1").lower()] = v.decode("latin-1")
            except (AttributeError, UnicodeDecodeError):
                continue
        with self.recorder.request(request_id=headers.get(self.request_id_header),
                                   tenant=headers.get(self.tenant_header), headers=headers,
                                   traceparent=headers.get("traceparent")) as req:
            rid = req.request_id.encode("latin-1", "replace")
            name = self.response_header

            async def send_with_id(message: MutableMapping[str, Any]) -> None:
                if name and message.get("type") == "http.response.start":
                    message = dict(message)
                    message["headers"] = [*message.get("headers", []), (name.encode(), rid)]
                await send(message)

            await self.app(scope, receive, send_with_id)
