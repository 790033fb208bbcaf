"""Settings: TOML plus CT1_<SECTION>__<KEY> variables; bad values fail in one line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from config.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "sidecar.example.toml"


def test_example_config_loads_and_shows_every_key():
    settings = load_settings(EXAMPLE)
    assert settings.source.slot == "ct1_cdc"
    doc = tomllib.loads(EXAMPLE.read_text())
    for section, model in Settings.model_fields.items():
        if section == "endpoints":
            shown = set(doc["endpoints"][0])
            fields = set(model.annotation.__args__[0].model_fields)  # type: ignore[union-attr]
        else:
            shown = set(doc[section])
            fields = set(model.annotation.model_fields)  # type: ignore[union-attr]
        assert shown == fields, f"[{section}] example differs: {shown ^ fields}"


def test_every_setting_has_a_description():
    for name, field in Settings.model_fields.items():
        model = field.annotation
        inner = getattr(model, "__args__", [model])[0]
        for key, sub in inner.model_fields.items():
            assert sub.description, f"{name}.{key} has no description"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\nslot = "from_file"\ndsn = "host=a"\n[outbox]\npath = "x.db"\n')
    monkeypatch.setenv("CT1_SOURCE__SLOT", "from_env")
    monkeypatch.setenv("CT1_API__PORT", "9999")
    s = load_settings(cfg)
    assert (s.source.slot, s.source.dsn, s.outbox.path, s.api.port) == ("from_env", "host=a", "x.db", 9999)


def test_env_secret_reference(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[source]\ndsn = "env:MY_DSN"\n')
    monkeypatch.setenv("MY_DSN", "host=secret-host")
    assert load_settings(cfg).source.dsn == "host=secret-host"
    monkeypatch.delenv("MY_DSN")
    with pytest.raises(ConfigError, match="MY_DSN is not set"):
        load_settings(cfg)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("[source]\nheartbeat_seconds = 'soon'\n", {}, "source.heartbeat_seconds"),
        ("[source]\nslot = 'Bad-Slot'\n", {}, "source.slot"),
        ("[outbox]\nbatch_max_events = 0\n", {}, "outbox.batch_max_events"),
        ("[sourse]\ndsn = 'x'\n", {}, "sourse: unknown setting"),
        ("[source]\ncolour = 1\n", {}, "source.colour: unknown setting"),
        ("", {"CT1_API__PORT": "http"}, "api.port"),
        ("[[endpoints]]\nname = 'x y'\nurl = 'http://127.0.0.1'\n", {}, "endpoints.0.name"),
        ("this is = = not toml", {}, "not valid TOML"),
        (
            "[outbox]\nbackend = 'jetstream'\n[[endpoints]]\nname = 'ct2.'\nurl = 'http://127.0.0.1'\n",
            {},
            "endpoint name 'ct2.' cannot be used with the jetstream backend",
        ),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(tmp_path, monkeypatch, text, env, expected):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_default_endpoints_send_analytics_to_ct3_only():
    from outbox.store import Route, Router

    s = Settings()
    router = Router([Route(e.name, tuple(e.events)) for e in s.endpoints])
    assert router.endpoints("marketplace.analytics") == ("ct3",)
    assert router.endpoints("order.status_changed") == ("ct2", "ct3")
    assert router.endpoints("cart.abandoned") == ("ct2", "ct3")
