"""Settings: one TOML file, overridden key by key by ``CT1_<SECTION>__<KEY>`` variables.

``load_settings`` is the only entry point.  A bad value fails with a one-line
:class:`ConfigError` that names the key and what is wrong with it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.errors import ConfigError
from common.formats import secret_key

DEFAULT_CONFIG = "config/sidecar.toml"
PACKAGE_DIR = Path(__file__).resolve().parent


def resolve_secret(value: str | None) -> str | None:
    """``env:NAME`` reads another variable; anything else is taken as it is."""
    if value is None or not value.startswith("env:"):
        return value
    name = value[4:]
    if name not in os.environ:
        raise ValueError(f"environment variable {name} is not set")
    return os.environ[name]


def check_dsn(value: str | None) -> str | None:
    """A libpq connection string (``key=value …`` or a ``postgresql://`` URI), checked
    when the settings load rather than at the first connection; "" stays as it is (the
    export DSN's "use source.dsn").  The error shows libpq's reason, never the string,
    which may hold a password."""
    if value:
        try:
            conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            reason = str(exc).splitlines()[0] if str(exc).strip() else "cannot be parsed"
            raise ValueError(f"not a libpq connection string ({reason})") from None
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Section):
    dsn: str = Field(
        "host=127.0.0.1 port=5432 user=postgres dbname=marketplace",
        description="libpq connection string of the marketplace database (env:NAME allowed)",
    )
    slot: str = Field(
        "ct1_cdc",
        pattern=r"^[a-z0-9_]{1,63}$",
        description="logical replication slot name (lower-case letters, digits, _)",
    )
    tables: list[str] = Field(
        default_factory=list,
        description="wal2json add-tables filter (schema.table); empty = every table, "
        "which also catches partitions created later",
    )
    heartbeat_seconds: float = Field(
        10.0, gt=0, description="how often to emit a heartbeat so the slot advances when idle"
    )
    status_interval_seconds: float = Field(
        10.0, gt=0, le=60, description="how often to report the confirmed position to Postgres"
    )
    slot_check_seconds: float = Field(
        30.0, gt=0, description="how often to read the slot's lag and wal_status"
    )
    lag_warning_bytes: int = Field(
        1 << 30, gt=0, description="log slot_lag as a warning when the slot retains more WAL"
    )
    reconnect_max_seconds: float = Field(30.0, gt=0, description="upper bound of the reconnect backoff")
    standby_poll_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often a capture whose slot another capture reads (a standby) tries to take over",
    )
    on_slot_lost: Literal["stop", "recover"] = Field(
        "stop",
        description="when Postgres invalidates or someone drops the slot: stop with one line, or "
        "recover (a new slot and a ct1.gap event, as `ct1-cdc recover` does)",
    )

    _secret = field_validator("dsn")(lambda v: check_dsn(resolve_secret(v)))


class JetStreamSettings(_Section):
    servers: list[str] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        description="NATS servers of the JetStream cluster (any of them; the client finds the rest)",
    )
    stream: str = Field(
        "CT1_EVENTS", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the stream holding the events"
    )
    subject: str = Field(
        "ct1.events",
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="the subject events are published on (partition p: <subject>.<p>)",
    )
    partitions: int = Field(
        16,
        ge=1,
        le=1024,
        description="partitions of the events by entity, the unit dispatchers share work by"
        " (fixed when the stream is made)",
    )
    replicas: int = Field(
        3, ge=1, le=5, description="copies of the stream kept by the cluster (a new stream)"
    )
    lease_seconds: float = Field(
        3.0,
        ge=0.5,
        le=60,
        description="dispatch nodes share the partitions by leases this long: a node that dies"
        " has its share taken over within about this (and a third of it)",
    )
    timeout_seconds: float = Field(
        5.0, gt=0, le=120, description="a publish or request without an answer fails after this"
    )


class OutboxSettings(_Section):
    backend: Literal["sqlite", "jetstream"] = Field(
        "sqlite",
        description='where events are kept: "sqlite" (the file at path) or "jetstream" (a NATS '
        "JetStream stream; the file at path is then this node's copy; docs/jetstream.md)",
    )
    jetstream: JetStreamSettings = Field(
        default_factory=JetStreamSettings, description='the stream, when backend = "jetstream"'
    )
    path: str = Field("var/outbox.db", description="SQLite outbox file")
    retention_days: int = Field(7, ge=1, description="delivered events older than this may be pruned")
    batch_max_events: int = Field(
        5000, ge=1, description="group commit: commit once this many events are pending"
    )
    batch_max_ms: int = Field(
        50, ge=0, description="group commit: commit at least this often while data streams in"
    )
    commit_interval_ms: float = Field(
        5.0, ge=0, description="group commit: at most one commit per this many ms when the stream pauses"
    )

    @property
    def capture_path(self) -> str:
        """The file of what capture keeps on this host: the outbox itself, or on the
        JetStream backend the copy of capture's state beside it (``<stem>.capture.db``),
        never the node's copy of the events.  Skip requests and backfill jobs go there."""
        if self.backend != "jetstream":
            return self.path
        path = Path(self.path)
        return str(path.with_name(f"{path.stem}.capture{path.suffix or '.db'}"))


class BackfillSettings(_Section):
    chunk_size: int = Field(
        2000, ge=1, le=100_000, description="backfill: rows read per chunk (one short transaction each)"
    )
    rate: float = Field(
        0.0,
        ge=0,
        description="backfill: rows a second at most when the command gives no --rate (0: no limit)",
    )


class ApiSettings(_Section):
    host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the HTTP API listens on")
    cache_ttl_customers: int = Field(3600, ge=0, description="seconds a customers export is cached")
    cache_ttl_products: int = Field(1800, ge=0, description="seconds a products export is cached")
    cache_ttl_analytics: int = Field(3600, ge=0, description="seconds analytics are cached")
    export_dsn: str | None = Field(
        None, description="marketplace database for exports (empty: source.dsn; env:NAME allowed)"
    )
    sql_dir: str | None = Field(None, description="folder holding exports.sql (empty: the built-in one)")
    statement_timeout_ms: int = Field(15000, ge=100, description="statement timeout of every export query")
    pool_size: int = Field(4, ge=1, le=100, description="connections to the marketplace database for exports")
    pool_timeout_seconds: float = Field(5.0, gt=0, description="how long a request waits for a connection")
    resume_wait_seconds: float = Field(
        5.0,
        ge=0,
        le=60,
        description="how long an export waits for capture to pass its snapshot before answering "
        "resume_event_id null",
    )

    rate_limit_per_minute: int = Field(
        600, ge=0, description="requests a minute per API key (token bucket; 0 turns limits off)"
    )
    rate_limit_burst: int = Field(100, ge=1, description="requests a key may make at once before the limit")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="proxy addresses/CIDRs whose X-Forwarded-For names the client (empty: none)",
    )

    _secret = field_validator("export_dsn")(lambda v: check_dsn(resolve_secret(v)))

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # ValueError names the bad entry
        return values


DEFAULT_RETRY_SCHEDULE: list[float] = [
    0,
    5,
    30,
    120,
    600,
    1800,
    3600,
    10800,
    21600,
    43200,
    86400,
    86400,
]


class DispatcherSettings(_Section):
    concurrency: int = Field(64, ge=1, le=1024, description="deliveries in flight at once")
    timeout_seconds: float = Field(15.0, gt=0, description="request timeout of one delivery")
    retry_schedule: list[float] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE),
        min_length=1,
        description="seconds to wait before each attempt; after the last, the delivery is dead",
    )
    require_https: bool = Field(True, description="refuse http:// endpoints except on loopback")
    endpoint_concurrency: int = Field(
        32, ge=1, le=1024, description="deliveries in flight at once to one endpoint"
    )
    pause_after_failures: int = Field(
        10, ge=1, description="consecutive failures after which an endpoint pauses and is probed"
    )
    probe_interval_seconds: float = Field(
        30.0, gt=0, description="seconds between probes of a paused endpoint"
    )
    refuse_private_networks: bool = Field(
        False, description="refuse endpoints that resolve to private network addresses"
    )


DEFAULT_MAPPING = "config/mapping.toml"


class MappingSettings(_Section):
    file: str = Field(
        DEFAULT_MAPPING,
        validate_default=True,
        description="mapping rules file (the default: config/mapping.toml where ct1-cdc runs,"
        " else the marketplace mapping installed with it)",
    )

    @field_validator("file")
    @classmethod
    def _installed_default(cls, value: str) -> str:
        """Run from anywhere (a container, ``pip install``) without the file: the default
        means the marketplace mapping, so the copy installed with the package serves."""
        if value == DEFAULT_MAPPING and not Path(value).exists():
            return str(PACKAGE_DIR / "mapping.toml")
        return value


class AnalyticsSettings(_Section):
    enabled: bool = Field(
        True, description="emit marketplace.analytics once per period (with the capture role)"
    )
    period_seconds: float = Field(
        3600.0, ge=1, description="length of a period, aligned to the epoch (3600: every hour on the hour)"
    )
    catch_up_periods: int = Field(
        24, ge=1, description="periods missed while stopped that are emitted on start, newest first kept"
    )
    settle_seconds: float = Field(
        5.0, ge=0, description="wait this long after a period ends before its figures are read"
    )
    retry_seconds: float = Field(30.0, gt=0, description="after a failed read, try again this much later")


class EndpointSettings(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="endpoint name")
    url: str = Field(description="webhook URL")
    secret: str | None = Field(None, description="whsec_ signing secret (env:NAME allowed)")
    previous_secret: str | None = Field(None, description="old secret, still signed while rotating")
    events: list[str] = Field(default_factory=lambda: ["*"], description="event type globs")
    enabled: bool = Field(True, description="deliver to this endpoint")

    @field_validator("secret", "previous_secret")
    @classmethod
    def _secret_key(cls, value: str | None) -> str | None:
        """``env:NAME`` read; "" means none (so the example config can show the key); a
        secret that is not ``whsec_<base64>`` of 16 bytes or more is refused here, with
        the endpoint's name, not when the first webhook is signed."""
        value = resolve_secret(value) or None
        if value is not None:
            try:
                secret_key(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


CT2_EVENTS = ["customer.*", "order.*", "payment.*", "product.*", "review.*", "cart.*", "cart_item.*"]


def default_endpoints() -> list[EndpointSettings]:
    return [
        EndpointSettings(name="ct2", url="http://127.0.0.1:9002/webhooks/ct1", events=CT2_EVENTS),
        EndpointSettings(name="ct3", url="http://127.0.0.1:9003/webhooks/ct1", events=["*"]),
    ]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CT1_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    source: SourceSettings = Field(default_factory=SourceSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    mapping: MappingSettings = Field(default_factory=MappingSettings)
    analytics: AnalyticsSettings = Field(default_factory=AnalyticsSettings)
    backfill: BackfillSettings = Field(default_factory=BackfillSettings)
    endpoints: list[EndpointSettings] = Field(default_factory=default_endpoints)

    @model_validator(mode="after")
    def _one_endpoint_a_name(self) -> Settings:
        """Each endpoint has its cursor, state and secret under its name: two of one name
        would silently become one."""
        seen: set[str] = set()
        for endpoint in self.endpoints:
            if endpoint.name in seen:
                raise ValueError(f"two [[endpoints]] are named {endpoint.name!r}: give each its own name")
            seen.add(endpoint.name)
        return self

    @model_validator(mode="after")
    def _names_fit_the_buckets(self) -> Settings:
        """On JetStream an endpoint's name is part of key-value keys (``<endpoint>.<p>``),
        whose dot-separated parts may not be empty."""
        if self.outbox.backend == "jetstream":
            for endpoint in self.endpoints:
                name = endpoint.name
                if name.startswith(".") or name.endswith(".") or ".." in name:
                    raise ValueError(
                        f"endpoint name {name!r} cannot be used with the jetstream backend"
                        " (its key-value keys: no dot at either end, no two dots in a row)"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; variables win over it.
        return (env_settings, init_settings)


def _holds_secret(loc: tuple[Any, ...]) -> bool:
    """A connection string or a signing secret: an error about it never echoes it."""
    return any(str(p).endswith(("dsn", "secret")) for p in loc)


def _known_at(loc: tuple[Any, ...]) -> list[str]:
    """The setting names that exist where ``loc`` points (its last part left out)."""
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an item of [[endpoints]]
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = field.annotation
        args = getattr(inner, "__args__", ())
        model = args[0] if args else inner
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _suggestion(loc: tuple[Any, ...]) -> str:
    close = difflib.get_close_matches(str(loc[-1]), _known_at(loc), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(error: Any) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown setting" + _suggestion(tuple(error["loc"]))
    value = error.get("input")
    hidden = isinstance(value, (dict, list)) or value is None or _holds_secret(error["loc"])
    shown = "" if hidden else f" (got {value!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _refuse_unknown_sections() -> None:
    """A ``CT1_<SECTION>__<KEY>`` variable whose section does not exist would be ignored
    without a word (pydantic-settings reads only the names it knows): refused instead,
    as an unknown key of a known section is."""
    sections = sorted(Settings.model_fields)
    for name in sorted(os.environ):
        if not name.upper().startswith("CT1_") or "__" not in name:
            continue
        section = name[4:].split("__", 1)[0].lower()
        if section not in sections:
            close = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
            hint = f" (did you mean CT1_{close[0].upper()}__...?)" if close else ""
            raise ConfigError(f"bad configuration: {name}: unknown setting section {section!r}{hint}")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the TOML file (if it exists) and the environment into :class:`Settings`."""
    chosen = path or os.environ.get("CT1_CONFIG")
    data: dict[str, Any] = {}
    if chosen is not None or Path(DEFAULT_CONFIG).exists():
        file = Path(chosen or DEFAULT_CONFIG)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {file} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    _refuse_unknown_sections()
    saved = os.environ.pop("CT1_CONFIG", None)
    try:
        return Settings(**data)
    except ValidationError as exc:
        details = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"bad configuration: {details}") from None
    except ValueError as exc:  # a resolve_secret failure outside pydantic's wrapping
        raise ConfigError(f"bad configuration: {exc}") from None
    finally:
        if saved is not None:
            os.environ["CT1_CONFIG"] = saved
