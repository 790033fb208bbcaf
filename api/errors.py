"""The one exception handlers raise for a client-visible error (see :mod:`api.app`)."""

from __future__ import annotations

from typing import Any


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

    def body(self) -> dict[str, Any]:
        """The error body: the one place its shape is written."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"success": False, "error": error}
