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
        ("[sourse]\ndsn = 'x'\n", {}, "sourse: unknown setting (did you mean 'source'?)"),
        (
            "[source]\nheartbeat_second = 1\n",
            {},
            "source.heartbeat_second: unknown setting (did you mean 'heartbeat_seconds'?)",
        ),
        (
            "[[endpoints]]\nname = 'a'\nurl = 'http://127.0.0.1'\nevent = ['*']\n",
            {},
            "endpoints.0.event: unknown setting (did you mean 'events'?)",
        ),
        (
            "",
            {"CT1_SORCE__DSN": "host=a"},
            "CT1_SORCE__DSN: unknown setting section 'sorce' (did you mean CT1_SOURCE__...?)",
        ),
        ("[source]\ncolour = 1\n", {}, "source.colour: unknown setting"),
        ("", {"CT1_API__PORT": "http"}, "api.port"),
        ("[[endpoints]]\nname = 'x y'\nurl = 'http://127.0.0.1'\n", {}, "endpoints.0.name"),
        ("this is = = not toml", {}, "not valid TOML"),
        (
            "[outbox]\nbackend = 'jetstream'\n[[endpoints]]\nname = 'ct2.'\nurl = 'http://127.0.0.1'\n",
            {},
            "endpoint name 'ct2.' cannot be used with the jetstream backend",
        ),
        (
            "[[endpoints]]\nname = 'ct2'\nurl = 'http://127.0.0.1:1'\n"
            "[[endpoints]]\nname = 'ct2'\nurl = 'http://127.0.0.1:2'\n",
            {},
            "two [[endpoints]] are named 'ct2': give each its own name",
        ),
        (
            "[[endpoints]]\nname = 'ct2'\nurl = 'http://127.0.0.1'\nsecret = 'whsec_not base64!'\n",
            {},
            "endpoints.0.secret: webhook secret is not whsec_<base64>",
        ),
        (
            "[[endpoints]]\nname = 'ct2'\nurl = 'http://127.0.0.1'\nprevious_secret = 'whsec_c2hvcnQ='\n",
            {},
            "endpoints.0.previous_secret: webhook secret is too short",
        ),
        ("", {"CT1_SOURCE__DSN": "not a dsn"}, "source.dsn: not a libpq connection string"),
        ("[api]\nexport_dsn = 'host=a port'\n", {}, "api.export_dsn: not a libpq connection string"),
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


def test_an_error_about_a_dsn_or_a_secret_never_shows_it(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[[endpoints]]\nname = 'ct2'\nurl = 'http://127.0.0.1'\nsecret = 'whsec_hunter2!'\n")
    monkeypatch.setenv("CT1_SOURCE__DSN", "host=db password=hunter2 sslmod=require")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "source.dsn" in str(err.value) and "endpoints.0.secret" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_the_default_mapping_is_the_installed_one_where_config_mapping_toml_is_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as in a container's work directory, or after pip install
    installed = ROOT / "config" / "mapping.toml"
    assert Path(load_settings().mapping.file).resolve() == installed.resolve()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mapping.toml").write_text("# this directory's own\n")
    assert load_settings().mapping.file == "config/mapping.toml"  # where it exists, it wins
    monkeypatch.setenv("CT1_MAPPING__FILE", "elsewhere.toml")
    assert load_settings().mapping.file == "elsewhere.toml"  # and a setting is taken as it is


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
    # the manual event of README's and docs/api.md's `POST /webhooks/send` example
    assert router.endpoints("order.note_added") == ("ct2", "ct3")
