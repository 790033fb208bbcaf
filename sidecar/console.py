"""What every ``ct1-cdc`` command shares: the ``main`` group and its subgroups, settings
loading, the one-line failure and JSON Lines output.  Command modules import this and
attach to its groups; :mod:`sidecar.cli` imports them all.

Every command exits non-zero with a one-line reason on failure; ``--json`` prints JSON
Lines.  Logging is configured here, once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson

from common import logs
from common.errors import Ct1Error
from config.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    click.echo(f"ct1-cdc: error: {message}", err=True)
    sys.exit(code)


def handled(fn: F) -> F:
    """Turn project errors into the one-line failure."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Ct1Error as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def settings_of(ctx: click.Context) -> Settings:
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config"))
    settings: Settings = obj["settings"]
    return settings


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=str).decode() + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="CT1_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML settings file [env CT1_CONFIG; default config/sidecar.toml]",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.version_option(package_name="ct1-cdc")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str) -> None:
    """ct1-cdc: change-data-capture sidecar for the marketplace (Core Transaction 1)."""
    ctx.ensure_object(dict)["config"] = config_path
    logs.configure(log_level)


# -- groups ------------------------------------------------------------------------------


@main.group()
def endpoints() -> None:
    """List, enable or disable webhook endpoints."""


@main.group()
def keys() -> None:
    """Create, list or revoke API keys."""


# -- slot -----------------------------------------------------------------------------------


@main.group()
def slot() -> None:
    """Inspect or drop the replication slot."""


@main.group()
def outbox() -> None:
    """Inspect the outbox."""
