"""Agent configuration: typed, validated at start, every error names the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

GOOD = """
device_id = "pi-kitchen-01"
state_dir = "state"
profile = "raspberry-pi-4"

[api]
socket_path = "/run/edge-agent/api.sock"
socket_mode = "0660"
max_batch = 8

[[models]]
path = "models/m.onnx"
"""


def test_valid_config_parses_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = parse_config(GOOD, base=tmp_path)
    assert cfg.device_id == "pi-kitchen-01"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.api.max_batch == 8
    assert cfg.api.max_pending == 64
    assert cfg.api.socket_mode == 0o660
    assert cfg.models[0].path == tmp_path / "models/m.onnx"
    assert cfg.models[0].schema == tmp_path / "models/m.schema.json"


@pytest.mark.parametrize(
    ("edit", "field", "says"),
    [
        (("max_batch = 8", "max_batch = 0"), "api.max_batch", "out of range; allowed 1..1024"),
        (("max_batch = 8", "max_batch = true"), "api.max_batch", "must be an integer"),
        (("max_batch = 8", 'max_batch = "8"'), "api.max_batch", "must be an integer"),
        (("max_batch = 8", "max_bach = 8"), "api.max_bach", "did you mean 'api.max_batch'"),
        (('profile = "raspberry-pi-4"', 'profil = "raspberry-pi-4"'), "profil", "did you mean 'profile'"),
        (('profile = "raspberry-pi-4"', ""), "profile", "is required but missing"),
        (('device_id = "pi-kitchen-01"', 'device_id = "pi/+/#"'), "device_id", "invalid"),
        (('socket_mode = "0660"', 'socket_mode = "0666"'), "api.socket_mode", "'other' must have no access"),
        (('socket_mode = "0660"', 'socket_mode = "rw"'), "api.socket_mode", "octal"),
        (('path = "models/m.onnx"', 'file = "models/m.onnx"'), "models[0].file", "not a known setting"),
        (("[api]", "[api]\nidle_timeout_s = -1"), "api.idle_timeout_s", "out of range"),
        (("[api]", 'log_level = "loud"\n[api]'), "log_level", "choose one of: debug, info"),
    ],
)
def test_bad_config_value_names_field_and_allowed_range(edit: tuple[str, str], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace(*edit), source="agent.toml")
    assert err.value.field == field
    assert says in str(err.value)
    assert str(err.value).startswith("agent.toml: ")


def test_malformed_toml_rejected_with_position() -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2, column 11"):
        parse_config('device_id = "x"\nprofile = =\n', source="agent.toml")


def test_unreadable_config_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot be read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"device_id = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_mqtt_and_telemetry_tables_validated(tmp_path: Path) -> None:
    cfg = parse_config(GOOD + '\n[mqtt]\nhost = "broker.local"\n[telemetry]\nwindow_s = 60\n', base=tmp_path)
    assert cfg.mqtt is not None and cfg.mqtt.host == "broker.local" and cfg.mqtt.port is None
    assert cfg.telemetry.window_s == 60.0
    assert parse_config(GOOD, base=tmp_path).mqtt is None  # offline by default
    for extra, field in (('[mqtt]\nhost = "b"\nport = 70000\n', "mqtt.port"),
                         ('[mqtt]\nhost = "b"\ncert_file = "c.pem"\n', "mqtt.cert_file"),
                         ('[mqtt]\nport = 1883\n', "mqtt.host"),
                         ("[telemetry]\nwindow_s = 0\n", "telemetry.window_s")):
        with pytest.raises(ConfigError) as err:
            parse_config(GOOD + "\n" + extra, source="agent.toml")
        assert err.value.field == field
