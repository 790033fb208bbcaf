"""The HTTP server around the API application: what aiohttp answers itself, before any
handler or middleware runs (a request line or header too long, bytes that are not HTTP),
gets the same JSON error body as everything else instead of aiohttp's text/plain.

aiohttp has no setting for it: its :class:`RequestHandler` (one per connection) formats
those answers in ``handle_error``.  :class:`ApiRunner` is an ``AppRunner`` whose server
makes connections with :class:`JsonErrorHandler`, which keeps aiohttp's status (400 for
every parse error) and its reason, and writes the JSON body.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from common.jsontext import dumps as json_bytes

log = structlog.get_logger("ct1_cdc.api")

MAX_MESSAGE = 200  # characters of aiohttp's reason kept in error.message
CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}  # as api.app


def error_response(status: int, exc: BaseException | None, message: str | None) -> web.Response:
    if status >= 500:
        code, text = "internal_error", "internal error"
    else:
        code = CODES.get(status, "bad_request")
        text = " ".join((message or "bad request").split())[:MAX_MESSAGE] or "bad request"
    body = {"success": False, "error": {"code": code, "message": text}}
    response = web.Response(body=json_bytes(body), status=status, content_type="application/json")
    response.force_close()  # as aiohttp does: the connection's state is unknown
    return response


class JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # a bug or a timeout outside the middleware: aiohttp logs it with its traceback
            super().handle_error(request, status, exc, message)
        else:
            # the client's own bytes: one line, and never the message (it quotes the
            # request, which may hold a key)
            log.debug("http_bad_request", status=status, error=type(exc).__name__, remote=request.remote)
            if request.writer.output_size > 0:
                raise ConnectionError("response already started: cannot send the error")
        return error_response(status, exc, message)


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer protocol errors with the JSON body."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        own: dict[str, Any] = dict(server._kwargs)
        return JsonErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **own,
        )
