"""The fleet server's settings: one typed, frozen object, validated once at start.

Sources, later ones winning: the defaults below, an optional TOML file, then ``FLEET_*`` environment
variables. Every field has a type, a unit in its name where it has one, and an allowed range. A bad value, an
unknown key (with the closest known key suggested) or a missing dependency between fields raises
:class:`SettingsError` naming the field and what is allowed.

TOML files group keys in tables named after the field prefix (``[mqtt] port = 8883`` is ``mqtt_port``); the
environment uses the upper-case field name (``FLEET_MQTT_PORT=8883``). ``FLEET_CONFIG`` names the TOML file.
Lists in the environment are comma-separated; booleans are ``true/false/1/0/yes/no/on/off``.

Nothing here runs at import time: :func:`load_settings` reads the environment and the file when called.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.protocol import MAX_FRAME_SIZE, is_valid_identifier

__all__ = ["ENV_PREFIX", "FleetSettings", "SettingsError", "load_settings"]

ENV_PREFIX = "FLEET_"

_SECTIONS = ("database", "mqtt", "ingest", "retention", "alerts", "api", "log", "bundle", "orders", "download",
             "rollout", "command", "device", "session", "public")


class SettingsError(ValueError):
    """A setting is invalid. ``field`` is the setting's name (``mqtt_port``); ``source`` says where it came
    from (``FLEET_MQTT_PORT``, ``/etc/fleet/server.toml``, ``default``)."""

    def __init__(self, field: str, message: str, source: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")
        self.field = field
        self.message = message
        self.source = source


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """All settings of ``fleet-server``. Build with :func:`load_settings` (or directly, e.g. in tests:
    the constructor validates too)."""

    database_url: str = "sqlite:///./fleet.db"
    """SQLAlchemy URL: ``sqlite:///path`` (default, WAL mode) or ``postgresql://`` (psycopg 3)."""
    database_busy_timeout_ms: int = 5000
    """SQLite: how long a writer waits for a lock before failing (1..600000 ms)."""
    database_pool_size: int = 5
    """PostgreSQL connection pool size (1..100)."""

    mqtt_host: str = "localhost"
    mqtt_port: int = 1883
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_client_id: str = "fleet-server"
    """Client id: with a persistent session the broker keeps the subscriptions (and queued QoS 1 messages)
    under this id while the server is away. Identifier rules."""
    mqtt_protocol: str = "5"
    """``"5"`` (MQTT v5: session expiry, shared subscriptions) or ``"3.1.1"`` (clean_session False)."""
    mqtt_session_expiry_s: int = 86400
    """MQTT v5 session expiry: how long the broker keeps the session while the server is offline (60..2**32-1)."""
    mqtt_shared_group: str | None = None
    """MQTT v5 shared-subscription group (``$share/{group}/fleet/v1/+/...``) to split ingestion across
    replicas; none = a plain subscription."""
    mqtt_keepalive_s: int = 30

    ingest_ack_interval_s: float = 1.0
    """Longest a received message waits before its batch is written and acknowledged (0.01..60 s)."""
    ingest_batch_size: int = 500
    """Most messages written in one transaction (1..20000)."""
    ingest_queue_size: int = 20000
    """Messages buffered between the MQTT thread and the writer; when full the MQTT thread blocks, which
    pushes back on the broker (100..1000000)."""
    ingest_max_frame_bytes: int = MAX_FRAME_SIZE
    """Largest frame accepted; larger ones are counted as oversized and dropped (64..256 KiB)."""
    ingest_max_ranges: int = 10000
    """Most received ranges kept per (device, stream); a message that would open a new range beyond it is
    dropped and counted, so a hostile device cannot grow the state without bound (16..1000000)."""
    ingest_auto_register: bool = True
    """Register unknown devices on first message. Off: messages from devices not in the registry are counted
    as ``unknown_device`` and dropped (the mode once provisioning exists)."""

    retention_raw_days: int = 14
    """Raw drift windows are kept this many days, then rolled up into hourly summaries (1..3650)."""
    retention_hourly_days: int = 90
    """Hourly summaries are kept this many days, then rolled up into daily ones (1..36500)."""

    alerts_webhook_urls: tuple[str, ...] = ()
    """Where drift/SLI alerts are POSTed (http or https URLs)."""
    alerts_webhook_secret: str | None = field(default=None, repr=False)
    """HMAC-SHA256 key for the ``X-Fleet-Signature`` header; required (16+ characters) with webhook URLs."""
    alerts_timeout_s: float = 5.0
    alerts_max_attempts: int = 5
    alerts_backoff_s: float = 1.0
    """First retry delay; doubles per attempt, with jitter (0..300 s)."""
    alerts_cooldown_s: float = 3600.0
    """After an alert for (model, version, feature), no other one for it within this time (0..604800 s)."""

    api_token: str | None = field(default=None, repr=False)
    """A bootstrap bearer token with the ``admin`` role (for automation before any user exists; 16+
    characters). None (the default): only users' API tokens and console sessions are accepted."""

    public_url: str = "http://127.0.0.1:8080"
    """The server's URL as devices reach it: deployment orders carry ``{public_url}/bundles/{digest}``."""

    bundle_dir: Path | None = None
    """Where uploaded bundles are stored, content-addressed (None: ``./bundles``)."""
    bundle_max_bytes: int = 512 * 1024 * 1024
    """Largest bundle accepted on upload (1 KiB..16 GiB); a larger upload is refused with 413 and nothing kept."""
    bundle_trust_root_file: Path | None = None
    """The fleet's trust root (``root.json``): uploaded bundles must carry enough valid release signatures
    under it. Required to accept uploads."""

    orders_key_file: Path | None = None
    """The Ed25519 private key (PEM, PKCS#8) that signs deployment orders and cancels; the trust root's
    ``orders`` role must name its public key. Required to run rollouts. Keep it out of the repository."""

    download_token_secret: str | None = field(default=None, repr=False)
    """HMAC key (32+ characters) of the bundle download tokens put in orders; every replica needs the same one.
    Required to run rollouts."""
    download_token_ttl_s: float = 7 * 86400.0
    """How long a download token in an order stays valid (60 s..30 days)."""

    rollout_interval_s: float = 1.0
    """How often the rollout loop evaluates running rollouts and consumes device events (0.05..60 s)."""
    command_resend_s: float = 30.0
    """A command not yet acknowledged by the device's ``received`` event is published again after this long
    (1 s..1 day); the delay doubles per attempt up to 16 times this."""
    command_ttl_s: float = 7 * 86400.0
    """Orders expire this long after they are issued (60 s..90 days); the server stops resending then."""

    device_stale_after_s: float = 180.0
    """A device not heard from (any message) for this long is stale: shown with its "stale since" time
    (10 s..30 days)."""

    session_ttl_s: float = 8 * 3600.0
    """Console sessions end this long after login (300 s..30 days)."""
    session_cookie_secure: bool = True
    """Mark the console session cookie ``Secure`` (HTTPS only). Turn off only for a plain-HTTP demo on localhost."""

    log_level: str = "info"

    def __post_init__(self) -> None:
        _validate(self)

    def with_changes(self, **changes: Any) -> FleetSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_LIMITS: dict[str, tuple[float, float]] = {
    "database_busy_timeout_ms": (1, 600_000),
    "database_pool_size": (1, 100),
    "mqtt_port": (1, 65535),
    "mqtt_session_expiry_s": (60, 2**32 - 1),
    "mqtt_keepalive_s": (5, 3600),
    "ingest_ack_interval_s": (0.01, 60),
    "ingest_batch_size": (1, 20000),
    "ingest_queue_size": (100, 1_000_000),
    "ingest_max_frame_bytes": (64, MAX_FRAME_SIZE),
    "ingest_max_ranges": (16, 1_000_000),
    "retention_raw_days": (1, 3650),
    "retention_hourly_days": (1, 36500),
    "alerts_timeout_s": (0.1, 120),
    "alerts_max_attempts": (1, 20),
    "alerts_backoff_s": (0, 300),
    "alerts_cooldown_s": (0, 604_800),
    "bundle_max_bytes": (1024, 16 * 1024**3),
    "download_token_ttl_s": (60, 30 * 86400),
    "rollout_interval_s": (0.05, 60),
    "command_resend_s": (1, 86400),
    "command_ttl_s": (60, 90 * 86400),
    "device_stale_after_s": (10, 30 * 86400),
    "session_ttl_s": (300, 30 * 86400),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "mqtt_protocol": ("5", "3.1.1"),
    "log_level": ("debug", "info", "warning", "error"),
}


def _validate(s: FleetSettings) -> None:
    for f in fields(s):
        value = getattr(s, f.name)
        kind = _kind(f.name)
        if value is None:
            if kind not in ("opt_str", "opt_path"):
                raise SettingsError(f.name, "is required")
            continue
        if kind == "bool" and not isinstance(value, bool):
            raise SettingsError(f.name, f"must be true or false, got {value!r}")
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingsError(f.name, f"must be an integer, got {value!r}")
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SettingsError(f.name, f"must be a finite number, got {value!r}")
            object.__setattr__(s, f.name, float(value))
        if kind in ("str", "opt_str") and not isinstance(value, str):
            raise SettingsError(f.name, f"must be a string, got {value!r}")
        if kind == "opt_path" and not isinstance(value, Path):
            object.__setattr__(s, f.name, Path(value))
        if kind == "urls":
            if not isinstance(value, (tuple, list)) or not all(isinstance(u, str) for u in value):
                raise SettingsError(f.name, f"must be a list of URLs, got {value!r}")
            object.__setattr__(s, f.name, tuple(value))
            for u in value:
                parts = urlsplit(u)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise SettingsError(f.name, f"{u!r} is not an http(s) URL")
        if f.name in _LIMITS:
            lo, hi = _LIMITS[f.name]
            if not lo <= value <= hi:
                unit = _unit(f.name)
                raise SettingsError(f.name, f"= {value!r} is out of range; allowed {_num(lo)}..{_num(hi)}{unit}")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise SettingsError(f.name, f"= {value!r} is not allowed; choose one of: {', '.join(_CHOICES[f.name])}")
    url = urlsplit(s.database_url)
    if url.scheme.split("+")[0] not in ("sqlite", "postgresql", "postgres"):
        raise SettingsError("database_url", f"must be a sqlite:// or postgresql:// URL, got scheme {url.scheme!r}")
    if not is_valid_identifier(s.mqtt_client_id):
        raise SettingsError("mqtt_client_id", "must be 1-64 characters of a-z, 0-9, '.', '_' or '-'")
    if s.mqtt_shared_group is not None:
        if not is_valid_identifier(s.mqtt_shared_group):
            raise SettingsError("mqtt_shared_group", "must be 1-64 characters of a-z, 0-9, '.', '_' or '-'")
        if s.mqtt_protocol != "5":
            raise SettingsError("mqtt_shared_group", "shared subscriptions need mqtt_protocol = \"5\"")
    if (s.mqtt_cert_file is None) != (s.mqtt_key_file is None):
        raise SettingsError("mqtt_key_file", "mqtt_cert_file and mqtt_key_file go together")
    if s.alerts_webhook_urls and (s.alerts_webhook_secret is None or len(s.alerts_webhook_secret) < 16):
        raise SettingsError("alerts_webhook_secret", "is required with webhook URLs and must be 16+ characters")
    if s.api_token is not None and len(s.api_token) < 16:
        raise SettingsError("api_token", "must be at least 16 characters")
    if s.download_token_secret is not None and len(s.download_token_secret) < 32:
        raise SettingsError("download_token_secret", "must be at least 32 characters")
    public = urlsplit(s.public_url)
    if public.scheme not in ("http", "https") or not public.netloc or public.query or public.fragment:
        raise SettingsError("public_url", f"must be an http(s) URL without query or fragment, got {s.public_url!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _unit(name: str) -> str:
    for suffix, unit in (("_ms", " ms"), ("_s", " s"), ("_days", " days"), ("_bytes", " bytes")):
        if name.endswith(suffix):
            return unit
    return ""


_TYPES: dict[str, str] = {}


def _kind(name: str) -> str:
    """The value kind of a field, from its annotation (kept as strings by ``from __future__ import annotations``)."""
    if not _TYPES:
        for f in fields(FleetSettings):
            ann = str(f.type)
            _TYPES[f.name] = {
                "str": "str", "int": "int", "float": "float", "bool": "bool",
                "str | None": "opt_str", "Path | None": "opt_path", "tuple[str, ...]": "urls",
            }[ann]
    return _TYPES[name]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(name: str, text: str, source: str) -> Any:
    """Convert an environment string to the field's type (names the field on failure)."""
    kind = _kind(name)
    try:
        if kind == "int":
            return int(text.strip())
        if kind == "float":
            return float(text.strip())
    except ValueError:
        raise SettingsError(name, f"must be {'an integer' if kind == 'int' else 'a number'}, got {text!r}",
                            source) from None
    if kind == "bool":
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise SettingsError(name, f"must be true or false, got {text!r}", source)
    if kind == "urls":
        return tuple(u.strip() for u in text.split(",") if u.strip())
    if kind in ("opt_str", "opt_path") and text == "":
        return None
    return text


def _flatten(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``{"mqtt": {"port": 1}}`` -> ``{"mqtt_port": 1}``; top-level keys may also be full field names."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            for sub, v in value.items():
                out[f"{key}_{sub}"] = v
        else:
            out[key] = value
    return out


def _unknown(key: str, known: list[str], source: str) -> SettingsError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return SettingsError(key, f"is not a known setting{hint}", source)


def load_settings(config: Path | str | None = None, *, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> FleetSettings:
    """Defaults, then the TOML file (``config`` or ``$FLEET_CONFIG``), then ``FLEET_*`` variables, then
    ``overrides`` (e.g. command-line options). Raises :class:`SettingsError` naming the field."""
    env = os.environ if env is None else env
    known = [f.name for f in fields(FleetSettings)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config if config is not None else env.get(f"{ENV_PREFIX}CONFIG") or None
    if path is not None:
        source = str(path)
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError("config", f"cannot read the settings file: {exc.strerror}", source) from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", f"is not valid TOML: {exc}", source) from None
        for key, value in _flatten(doc).items():
            if key not in known:
                raise _unknown(key, known, source)
            values[key] = tuple(value) if isinstance(value, list) else value
            sources[key] = source
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        key = var[len(ENV_PREFIX):].lower()
        if key not in known:
            raise _unknown(key, known, var)
        values[key] = _from_text(key, text, var)
        sources[key] = var
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in known:
            raise _unknown(key, known, "override")
        values[key] = value
        sources[key] = "command line"
    try:
        return FleetSettings(**values)
    except SettingsError as exc:
        raise SettingsError(exc.field, exc.message, exc.source or sources.get(exc.field, "default")) from None
