"""Settings: one frozen object; env and TOML sources; every bad value names its field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fleet_server.settings import FleetSettings, SettingsError, load_settings


def test_defaults_without_any_source() -> None:
    s = load_settings(env={})
    assert s.database_url == "sqlite:///./fleet.db"
    assert s.mqtt_port == 1883 and s.mqtt_tls is False and s.ingest_ack_interval_s == 1.0
    assert s.api_token is None and s.alerts_webhook_urls == ()


def test_settings_are_frozen() -> None:
    s = load_settings(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mqtt_port = 1  # type: ignore[misc]


def test_env_overrides_toml_and_converts_types(tmp_path: Path) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text('[mqtt]\nhost = "broker"\nport = 8883\ntls = true\n[retention]\nraw_days = 7\n'
                   '[alerts]\nwebhook_urls = ["https://hooks.example/a"]\nwebhook_secret = "0123456789abcdef"\n')
    s = load_settings(env={"FLEET_CONFIG": str(cfg), "FLEET_MQTT_PORT": "9883",
                           "FLEET_INGEST_ACK_INTERVAL_S": "0.25", "FLEET_INGEST_AUTO_REGISTER": "no"})
    assert (s.mqtt_host, s.mqtt_port, s.mqtt_tls) == ("broker", 9883, True)
    assert s.retention_raw_days == 7 and s.ingest_ack_interval_s == 0.25 and s.ingest_auto_register is False
    assert s.alerts_webhook_urls == ("https://hooks.example/a",)


@pytest.mark.parametrize(("env", "field", "words"), [
    ({"FLEET_MQTT_PORT": "0"}, "mqtt_port", "1..65535"),
    ({"FLEET_MQTT_PORT": "eighty"}, "mqtt_port", "integer"),
    ({"FLEET_INGEST_ACK_INTERVAL_S": "120"}, "ingest_ack_interval_s", "0.01..60 s"),
    ({"FLEET_MQTT_TLS": "maybe"}, "mqtt_tls", "true or false"),
    ({"FLEET_DATABASE_URL": "mysql://x/y"}, "database_url", "sqlite:// or postgresql://"),
    ({"FLEET_ALERTS_WEBHOOK_URLS": "https://h/x"}, "alerts_webhook_secret", "required"),
    ({"FLEET_ALERTS_WEBHOOK_URLS": "ftp://h/x", "FLEET_ALERTS_WEBHOOK_SECRET": "s" * 16},
     "alerts_webhook_urls", "http(s)"),
    ({"FLEET_MQTT_SHARED_GROUP": "ingest", "FLEET_MQTT_PROTOCOL": "3.1.1"}, "mqtt_shared_group", "5"),
    ({"FLEET_API_TOKEN": "short"}, "api_token", "16"),
    ({"FLEET_MQTT_PROT": "5"}, "mqtt_prot", "did you mean 'mqtt_port'"),
])
def test_bad_value_names_the_field(env: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(SettingsError) as exc:
        load_settings(env=env)
    assert exc.value.field == field
    assert field in str(exc.value) and words in str(exc.value)


def test_bad_toml_value_names_file_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text("[ingest]\nbatch_size = 0\n")
    with pytest.raises(SettingsError) as exc:
        load_settings(cfg, env={})
    assert exc.value.field == "ingest_batch_size" and str(cfg) in str(exc.value) and "1..20000" in str(exc.value)
    cfg.write_text("[ingest]\nbatch_sise = 5\n")
    with pytest.raises(SettingsError, match="did you mean 'ingest_batch_size'"):
        load_settings(cfg, env={})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})


def test_secrets_stay_out_of_repr() -> None:
    s = FleetSettings(api_token="t" * 20, alerts_webhook_urls=("https://h/x",), alerts_webhook_secret="k" * 16,
                      mqtt_password="hunter2hunter2")
    assert "t" * 20 not in repr(s) and "k" * 16 not in repr(s) and "hunter2" not in repr(s)


def test_overrides_win_and_are_validated() -> None:
    s = load_settings(env={"FLEET_DATABASE_URL": "sqlite:///a.db"}, database_url="sqlite:///b.db")
    assert s.database_url == "sqlite:///b.db"
    with pytest.raises(SettingsError) as exc:
        load_settings(env={}, mqtt_port=70000)
    assert exc.value.field == "mqtt_port" and "command line" in str(exc.value)
