"""Query parameters, validated: each accessor answers a 422 naming the parameter."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta

from api.errors import ApiError

MAX_ID = 2**63 - 1  # ids are 64-bit integers in SQLite and Postgres


class Query:
    """Validated query parameters: each accessor raises a 422 naming the parameter."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self.params = params

    def _raw(self, name: str) -> str | None:
        value = self.params.get(name)
        return None if value is None or value == "" else value

    def integer(self, name: str, *, minimum: int = 1, maximum: int = MAX_ID) -> int | None:
        value = self._bounded(name, int, "an integer", minimum, maximum)
        return None if value is None else int(value)

    def number(self, name: str, *, minimum: float, maximum: float) -> float | None:
        return self._bounded(name, float, "a number", minimum, maximum)

    def _bounded(
        self, name: str, parse: type[int] | type[float], kind: str, minimum: float, maximum: float
    ) -> float | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = parse(raw)
        except ValueError:
            raise ApiError(422, "invalid_parameter", f"{name} must be {kind}", name) from None
        if not minimum <= value <= maximum:  # also refuses nan
            bounds = f"between {_show(minimum)} and {_show(maximum)}"
            raise ApiError(422, "invalid_parameter", f"{name} must be {bounds}", name)
        return value

    def boolean(self, name: str) -> bool | None:
        raw = self._raw(name)
        if raw is None:
            return None
        lowered = raw.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ApiError(422, "invalid_parameter", f"{name} must be true or false", name)

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        raw = self._raw(name)
        if raw is not None and raw not in allowed:
            raise ApiError(422, "invalid_parameter", f"{name} must be one of {', '.join(allowed)}", name)
        return raw

    def text(self, name: str, *, max_length: int = 200) -> str | None:
        raw = self._raw(name)
        if raw is not None and (len(raw) > max_length or "\x00" in raw):
            raise ApiError(422, "invalid_parameter", f"{name} must be at most {max_length} characters", name)
        return raw

    def moment(self, name: str, *, end: bool = False) -> datetime | None:
        """A date (``2026-11-25``) or an ISO 8601 time.  As the end of a range a date
        means the whole day: the bound returned is exclusive."""
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            if len(raw) == 10:
                day = date.fromisoformat(raw)
                start = datetime(day.year, day.month, day.day, tzinfo=UTC)
                return start + timedelta(days=1) if end else start
            value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(
                422, "invalid_parameter", f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time", name
            ) from None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value + timedelta(microseconds=1) if end else value

    def date_range(self) -> tuple[datetime | None, datetime | None]:
        start, end = self.moment("date_from"), self.moment("date_to", end=True)
        if start is not None and end is not None and end <= start:
            raise ApiError(422, "invalid_parameter", "date_to must not be before date_from", "date_to")
        return start, end


def _show(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
