"""The API's errors as exceptions: ``{"success": false, "error": {"code", "message",
"field"}}`` with its status becomes one of these, so a caller catches what it can act on.

    try:
        client.orders(status="bogus")
    except InvalidRequest as exc:
        print(exc.field, exc.message)        # status  must be one of ...
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class Ct1Error(Exception):
    """An answer of ct1-cdc that is not a success, or no answer at all."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message if field is None else f"{message} (field {field})")
        self.message = message
        self.status = status
        self.code = code
        self.field = field


class AuthError(Ct1Error):
    """401: no key, an unknown, revoked or malformed key."""


class PermissionDenied(Ct1Error):
    """403: the key lacks the permission, or this address is outside its allow-list."""


class NotFound(Ct1Error):
    """404: no such id (or path)."""


class InvalidRequest(Ct1Error):
    """400 or 422: a parameter or body the API refused; ``field`` names it."""


class RateLimited(Ct1Error):
    """429: wait ``retry_after`` seconds (the answer's ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: float, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class Unavailable(Ct1Error):
    """503, or no connection: the marketplace database, the outbox or the API itself is
    unavailable for now; retrying later can succeed."""


class ServerError(Ct1Error):
    """Any other 5xx (a bug in ct1-cdc: report it)."""


# what a consumer retries by itself (with backoff); the others need a person
RETRYABLE = (RateLimited, Unavailable, ServerError)

_BY_STATUS: dict[int, type[Ct1Error]] = {
    400: InvalidRequest,
    401: AuthError,
    403: PermissionDenied,
    404: NotFound,
    422: InvalidRequest,
    503: Unavailable,
}


def retry_after_seconds(headers: Mapping[str, str], default: float = 1.0) -> float:
    """``Retry-After`` in seconds (the API sends whole seconds; an HTTP date is not used)."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


def error_for(status: int, body: bytes, headers: Mapping[str, str]) -> Ct1Error:
    """The exception of an answer that is not a success."""
    code = field = None
    message = f"HTTP {status}"
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code = error.get("code") if isinstance(error.get("code"), str) else None
        field = error.get("field") if isinstance(error.get("field"), str) else None
        if isinstance(error.get("message"), str):
            message = error["message"]
    elif body:
        message = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
    if status == 429:
        return RateLimited(
            message, retry_after=retry_after_seconds(headers), status=status, code=code, field=field
        )
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else Ct1Error)
    return kind(message, status=status, code=code, field=field)
