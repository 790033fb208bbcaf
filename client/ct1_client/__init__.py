"""ct1-cdc's client for CT2 and CT3 (its own distribution: ``pip install ./client``, with
nothing of the sidecar in it).

* :class:`Client` and :class:`AsyncClient`: the HTTP API as typed calls (exports as
  iterators, ``consume`` to follow ``/events`` from a durable position,
  ``seed_then_tail``), errors as :mod:`ct1_client.errors`;
* :mod:`ct1_client.models`: the envelope, every event type's data, every export's rows;
* :mod:`ct1_client.kit`: a webhook receiver (verify, deduplicate, hand over);
  :mod:`ct1_client.webhooks`: the signature check alone, on the standard library only.

Names are imported when first used, so ``ct1_client.webhooks`` works without the HTTP
client's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ct1_client._async import AsyncClient, AsyncRows
    from ct1_client._sync import Client, Rows
    from ct1_client.errors import (
        AuthError,
        Ct1Error,
        InvalidRequest,
        NotFound,
        PermissionDenied,
        RateLimited,
        ServerError,
        Unavailable,
    )
    from ct1_client.models import parse_event
    from ct1_client.positions import (
        CallbackPosition,
        FilePosition,
        MemoryPosition,
        PositionStore,
        SqlitePosition,
    )

_HOMES = {
    "AsyncClient": "_async",
    "AsyncRows": "_async",
    "Client": "_sync",
    "Rows": "_sync",
    "AuthError": "errors",
    "Ct1Error": "errors",
    "InvalidRequest": "errors",
    "NotFound": "errors",
    "PermissionDenied": "errors",
    "RateLimited": "errors",
    "ServerError": "errors",
    "Unavailable": "errors",
    "parse_event": "models",
    "CallbackPosition": "positions",
    "FilePosition": "positions",
    "MemoryPosition": "positions",
    "PositionStore": "positions",
    "SqlitePosition": "positions",
}

__all__ = [
    "AsyncClient",
    "AsyncRows",
    "AuthError",
    "CallbackPosition",
    "Client",
    "Ct1Error",
    "FilePosition",
    "InvalidRequest",
    "MemoryPosition",
    "NotFound",
    "PermissionDenied",
    "PositionStore",
    "RateLimited",
    "Rows",
    "ServerError",
    "SqlitePosition",
    "Unavailable",
    "parse_event",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ct1_client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ct1_client.{home}"), name)
