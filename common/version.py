"""The installed ct1-cdc version, as webhooks' User-Agent and ``/healthz`` report it."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version


@cache
def version() -> str:
    try:
        return package_version("ct1-cdc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"
