"""The agent's configuration: one typed, frozen object validated at start.

Read from TOML (``edge-agent run --config /etc/edge-agent/agent.toml``). Every field has a type, a unit in its
name where it has one, and an allowed range; a bad value, an unknown key (with the closest known one suggested)
or a missing required key raises :class:`ConfigError` naming the file, the field and what is allowed. Relative
paths are resolved against the config file's directory.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.protocol import InvalidIdentifierError, validate_device_id

__all__ = [
    "AgentConfig", "ApiConfig", "ConfigError", "ModelEntry", "MqttConfig", "TelemetryConfig", "UpdatesConfig",
    "load_config", "parse_config",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


class ConfigError(ValueError):
    """The configuration is invalid. ``field`` is the dotted key (``api.max_batch``)."""

    def __init__(self, source: str, field: str, message: str) -> None:
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.field = field


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The local inference API (HTTP/1.1 over a Unix domain socket)."""

    socket_path: Path
    socket_mode: int = 0o660
    socket_group: str | None = None
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    max_connections: int = 32
    max_request_bytes: int = 1 << 20
    max_pending: int = 64
    max_batch: int = 16
    idle_timeout_s: float = 60.0
    read_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model served from a file (before bundles: a model file and its ``.schema.json``)."""

    path: Path
    schema: Path


@dataclass(frozen=True, slots=True)
class UpdatesConfig:
    """Signed bundle installs. Without ``trust_root`` the agent serves only its configured model files."""

    trust_root: Path | None = None
    crash_loop_limit: int = 3
    tick_s: float = 1.0


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The fleet connection. Without ``[mqtt]`` the agent works offline: no telemetry leaves the device."""

    host: str
    port: int | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 60
    drain_rate: float = 20.0
    ack_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    window_s: float = 300.0
    window_samples: int = 10_000
    outbox_max_bytes: int = 32 << 20
    outbox_max_age_s: float = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    profile: str
    api: ApiConfig
    models: tuple[ModelEntry, ...] = ()
    profiles_dir: Path | None = None
    log_level: str = "info"
    log_format: str = "json"
    updates: UpdatesConfig = UpdatesConfig()
    mqtt: MqttConfig | None = None
    telemetry: TelemetryConfig = TelemetryConfig()


class _Reader:
    """Typed access to one TOML table that records which keys were used."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any], base: Path, known: set[str]) -> None:
        self.source, self.prefix, self.table, self.base = source, prefix, table, base
        self.used: set[str] = set()
        # Unknown keys first: a misspelt key is the likelier mistake than a missing one.
        unknown = sorted(set(table) - known)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{self._name(close[0])}'?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise self.fail(key, f"is not a known setting{hint}")

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self._name(key), message)

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise self.fail(key, "is required but missing")
            return default
        return self.table[key]

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               choices: tuple[str, ...] = ()) -> str | None:
        v = self._get(key, default, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.fail(key, f"must be a string, got {type(v).__name__} {v!r}")
        if choices and v not in choices:
            raise self.fail(key, f"= {v!r} is not allowed; choose one of: {', '.join(choices)}")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self._get(key, default, False)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer from {lo} to {hi}, got {v!r}")
        if not lo <= v <= hi:
            raise self.fail(key, f"= {v} is out of range; allowed {lo}..{hi}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(key, default, False)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(key, f"must be a number from {lo} to {hi}, got {v!r}")
        if not lo <= v <= hi:
            raise self.fail(key, f"= {v} is out of range; allowed {lo}..{hi}")
        return float(v)

    def path(self, key: str, default: str | None = None, *, required: bool = False) -> Path | None:
        s = self.string(key, default, required=required)
        if s is None:
            return None
        if not s or "\x00" in s:
            raise self.fail(key, "must be a non-empty path")
        p = Path(s).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def int_list(self, key: str, lo: int, hi: int) -> tuple[int, ...]:
        v = self._get(key, [], False)
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi
                                          for x in v):
            raise self.fail(key, f"must be a list of integers from {lo} to {hi}, got {v!r}")
        return tuple(v)

    def table_of(self, key: str) -> Mapping[str, Any]:
        v = self._get(key, {}, False)
        if not isinstance(v, Mapping):
            raise self.fail(key, "must be a table")
        return v


def parse_config(text: str, *, source: str = "<config>", base: Path | None = None) -> AgentConfig:
    """Parse and validate TOML text (pure but for nothing: paths are only resolved, not opened)."""
    base = base or Path.cwd()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"is not valid TOML: {exc}") from None
    top = _Reader(source, "", doc, base, {"device_id", "state_dir", "profile", "profiles_dir", "log_level",
                                          "log_format", "api", "models", "updates", "mqtt", "telemetry"})
    device_id = top.string("device_id", required=True)
    assert device_id is not None
    try:
        validate_device_id(device_id)
    except InvalidIdentifierError as exc:
        raise top.fail("device_id", str(exc)) from None
    state_dir = top.path("state_dir", "/var/lib/edge-agent")
    profile = top.string("profile", required=True)
    profiles_dir = top.path("profiles_dir")
    log_level = top.string("log_level", "info", choices=LOG_LEVELS)
    log_format = top.string("log_format", "json", choices=LOG_FORMATS)

    api_t = _Reader(source, "api.", top.table_of("api"), base, {f.name for f in fields(ApiConfig)})
    mode_s = api_t.string("socket_mode", "0660")
    assert mode_s is not None
    try:
        mode = int(mode_s, 8)
    except ValueError:
        raise api_t.fail("socket_mode", f"= {mode_s!r} must be an octal string such as \"0660\"") from None
    if not 0o600 <= mode <= 0o777 or mode & 0o007:
        raise api_t.fail("socket_mode", f"= {mode_s!r}: the owner needs rw and 'other' must have no access "
                                        "(use 0600, 0660 or 0670); restrict callers by group")
    api = ApiConfig(
        socket_path=api_t.path("socket_path", "/run/edge-agent/api.sock") or Path(),
        socket_mode=mode,
        socket_group=api_t.string("socket_group") or None,
        allowed_uids=api_t.int_list("allowed_uids", 0, 2**32 - 1),
        allowed_gids=api_t.int_list("allowed_gids", 0, 2**32 - 1),
        max_connections=api_t.integer("max_connections", 32, 1, 1024),
        max_request_bytes=api_t.integer("max_request_bytes", 1 << 20, 1024, 64 << 20),
        max_pending=api_t.integer("max_pending", 64, 1, 10_000),
        max_batch=api_t.integer("max_batch", 16, 1, 1024),
        idle_timeout_s=api_t.number("idle_timeout_s", 60.0, 0.1, 3600.0),
        read_timeout_s=api_t.number("read_timeout_s", 10.0, 0.1, 600.0),
    )
    if len(str(api.socket_path)) > 107:
        raise api_t.fail("socket_path", "is longer than the 107 bytes a Unix socket path may have")

    raw_models = doc.get("models", [])
    if not isinstance(raw_models, list):
        raise top.fail("models", "must be an array of tables ([[models]])")
    models: list[ModelEntry] = []
    for i, entry in enumerate(raw_models):
        if not isinstance(entry, Mapping):
            raise ConfigError(source, f"models[{i}]", "must be a table")
        r = _Reader(source, f"models[{i}].", entry, base, {"path", "schema"})
        path = r.path("path", required=True)
        assert path is not None
        schema = r.path("schema") or path.with_name(path.name.rsplit(".", 1)[0] + ".schema.json")
        models.append(ModelEntry(path, schema))
    up = _Reader(source, "updates.", top.table_of("updates"), base, {f.name for f in fields(UpdatesConfig)})
    updates = UpdatesConfig(
        trust_root=up.path("trust_root"),
        crash_loop_limit=up.integer("crash_loop_limit", 3, 1, 100),
        tick_s=up.number("tick_s", 1.0, 0.05, 60.0),
    )
    mqtt: MqttConfig | None = None
    if "mqtt" in doc:
        mq = _Reader(source, "mqtt.", top.table_of("mqtt"), base, {f.name for f in fields(MqttConfig)})
        host = mq.string("host", required=True)
        assert host is not None
        port_raw = mq.table.get("port")
        tls = [mq.path(k) for k in ("ca_file", "cert_file", "key_file")]
        if (tls[1] is None) != (tls[2] is None):
            raise mq.fail("cert_file", "cert_file and key_file go together (the device's certificate and its key)")
        mqtt = MqttConfig(host=host, port=None if port_raw is None else mq.integer("port", 1883, 1, 65535),
                          ca_file=tls[0], cert_file=tls[1], key_file=tls[2],
                          keepalive_s=mq.integer("keepalive_s", 60, 5, 3600),
                          drain_rate=mq.number("drain_rate", 20.0, 0.1, 10_000.0),
                          ack_timeout_s=mq.number("ack_timeout_s", 30.0, 0.1, 3600.0))
    te = _Reader(source, "telemetry.", top.table_of("telemetry"), base, {f.name for f in fields(TelemetryConfig)})
    telemetry = TelemetryConfig(
        window_s=te.number("window_s", 300.0, 0.1, 86400.0),
        window_samples=te.integer("window_samples", 10_000, 1, 10_000_000),
        outbox_max_bytes=te.integer("outbox_max_bytes", 32 << 20, 1 << 16, 1 << 34),
        outbox_max_age_s=te.number("outbox_max_age_s", 7 * 86400.0, 60.0, 365 * 86400.0),
    )
    assert state_dir is not None and profile is not None and log_level is not None and log_format is not None
    return AgentConfig(device_id, state_dir, profile, api, tuple(models), profiles_dir, log_level, log_format,
                       updates, mqtt, telemetry)


def load_config(path: Path) -> AgentConfig:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "is not UTF-8 text") from None
    return parse_config(text, source=str(path), base=path.resolve().parent)
