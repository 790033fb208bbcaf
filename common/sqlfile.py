"""Named SQL blocks in ``.sql`` files, loaded once, as package resources.

A package keeps its files in ``sql/``; each holds blocks that start with a
``-- name: NAME`` line::

    -- name: append_event
    INSERT INTO events ...

``load("outbox", "deliveries.sql")`` reads ``outbox/sql/deliveries.sql`` through
:mod:`importlib.resources`, so it works wherever the package is installed from.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_NAME = re.compile(r"^--\s*name:\s*(\S+)\s*$", re.MULTILINE)


def parse_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in blocks:
            raise ValueError(f"duplicate SQL block {name!r}")
        blocks[name] = body.strip()
    return blocks


def text(package: str, name: str) -> str:
    """The text of ``sql/NAME`` in ``package``."""
    return (files(package) / "sql" / name).read_text(encoding="utf-8")


@cache
def load(package: str, name: str) -> dict[str, str]:
    """The blocks of ``sql/NAME`` in ``package`` (read once)."""
    return parse_blocks(text(package, name))
