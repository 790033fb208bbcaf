"""The one exception handlers raise for a client-visible error (see :mod:`api.app`)."""

from __future__ import annotations


class ApiError(Exception):
    """Answered as ``{"success": false, "error": {"code", "message", "field"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        *,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after = retry_after  # seconds, sent as Retry-After
