"""Message types of the wire contract and their (version-tolerant) mapping to plain wire data.

Every message is, on the wire, a map holding:

* ``"t"``: the type tag (``"heartbeat"``, ``"status"``, ``"event"``, ``"drift_window"``, ``"ack"``,
  ``"command"``),
* ``"v"``: the schema version ``[major, minor]`` it was written against,
* one key per field, named exactly like the dataclass attribute (``None`` is sent as nil; every known
  field is always present),
* any *unknown* keys, which a newer minor version may have added.

Versioning (the python-tuf "unrecognized fields" idea, ADR 0008 there): a receiver accepts any minor
of its own major; keys it does not know are kept in the message's ``extra`` mapping and written back
unchanged when the message is re-encoded, so an old agent can talk to a newer server (and a server can
store and relay what it does not understand). A different major raises
:class:`~agent.protocol.errors.UnsupportedSchemaVersionError`. A decoded message keeps the version it
was written with in ``schema_version``, so re-encoding it is byte-identical.

Validation runs in ``__post_init__``, both when code constructs a message and when one is decoded: an
invalid message cannot exist in memory. Problems raise
:class:`~agent.protocol.errors.InvalidFieldError` (or its subclass
:class:`~agent.protocol.errors.InvalidIdentifierError`) naming the field. Both are
:class:`~agent.protocol.errors.DecodeError`\\ s. Values are normalised on the way in: ranges and
``models`` become tuples, ints given for float fields become floats, and opaque mappings (``detail``,
``features``, ``slis``, ``order``, ``extra``) are deep-copied into plain ``dict``/``list`` data. Treat those copies
as read-only.

Opaque plain data is JSON-compatible data: ``None``, ``bool``, ``int`` (in the msgpack range), finite
``float``, ``str``, lists, and maps with ``str`` keys, nested at most :data:`MAX_NESTING` deep. No bytes,
NaN, infinity or numpy scalars (convert those first: that keeps the JSON debug form exact).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, Self, TypeAlias

from agent.protocol.errors import (
    DecodeError,
    InvalidFieldError,
    UnknownMessageTypeError,
    UnsupportedSchemaVersionError,
    _short_repr,
)
from agent.protocol.sequence import MAX_SEQ, SeqRange, validate_ranges, validate_seq
from agent.protocol.topics import Channel, device_topic, validate_device_id, validate_identifier

__all__ = [
    "COMMAND_KINDS",
    "ENVELOPE_KEYS",
    "MAX_AGENT_VERSION_LEN",
    "MAX_NESTING",
    "MAX_REASON_LEN",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "Ack",
    "Command",
    "CommandKind",
    "DriftWindow",
    "Event",
    "Heartbeat",
    "Message",
    "ModelState",
    "Status",
    "StatusState",
    "from_wire",
    "message_topic",
    "to_wire",
]

SCHEMA_VERSION: Final[tuple[int, int]] = (1, 0)
"""``(major, minor)`` of the message schema this build writes. Minor bumps only add optional
information (old readers keep it in ``extra``); anything else is a major bump."""

ENVELOPE_KEYS: Final = frozenset({"t", "v"})
"""Wire keys every message carries besides its fields: type tag and schema version."""

MAX_NESTING: Final = 32
"""Deepest nesting of lists/maps allowed inside opaque data (bounds recursion on hostile input)."""

MAX_REASON_LEN: Final = 1024
"""Longest ``Event.reason`` in characters."""

MAX_AGENT_VERSION_LEN: Final = 64
"""Longest ``Status.agent_version`` in characters."""

_MAX_INT: Final = MAX_SEQ  # integer fields (versions, counts) share the signed 64-bit bound
_MSGPACK_INT_MIN: Final = -(2**63)
_MSGPACK_INT_MAX: Final = 2**64 - 1
_EVENT_KIND_RE: Final = re.compile(r"[a-z_]{1,32}")
_COMMAND_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SIMPLE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_]{1,64}")

StatusState: TypeAlias = Literal["online", "offline"]
"""Values of ``Status.state``."""

_STATUS_STATES: Final = ("online", "offline")

CommandKind: TypeAlias = Literal["deploy", "cancel"]
"""Values of ``Command.kind`` (a closed set: adding one is a major schema change)."""

COMMAND_KINDS: Final[frozenset[str]] = frozenset({"deploy", "cancel"})
"""Every valid ``Command.kind``."""


# --------------------------------------------------------------------------------------------------
# Field checkers. Each returns the (normalised) value or raises InvalidFieldError naming ``field``.
# --------------------------------------------------------------------------------------------------


def _check_int(value: object, field: str, *, maximum: int = _MAX_INT) -> int:
    if type(value) is not int:  # bool is an int subclass: refused on purpose
        raise InvalidFieldError(f"must be an int, not {type(value).__name__}", field=field)
    if not 0 <= value <= maximum:
        raise InvalidFieldError(f"must be between 0 and {maximum}, got {_short_repr(value)}", field=field)
    return value


def _check_float(value: object, field: str) -> float:
    """Non-negative finite number; ints are accepted (some encoders write whole floats as ints)."""
    if type(value) is int:
        try:
            value = float(value)
        except OverflowError:
            raise InvalidFieldError("number too large", field=field) from None
    if type(value) is not float:
        raise InvalidFieldError(f"must be a number, not {type(value).__name__}", field=field)
    if not math.isfinite(value) or value < 0:
        raise InvalidFieldError(f"must be a finite number >= 0, got {value!r}", field=field)
    return value


def _check_bool(value: object, field: str) -> bool:
    if type(value) is not bool:
        raise InvalidFieldError(f"must be a bool, not {type(value).__name__}", field=field)
    return value


def _check_utf8(value: str, field: str) -> str:
    if value.isascii():  # the common case, and much cheaper than encoding
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFieldError("string is not valid Unicode (lone surrogate)", field=field) from None
    return value


def _check_text(value: object, field: str, *, max_len: int, printable: bool) -> str:
    if not isinstance(value, str):
        raise InvalidFieldError(f"must be a str, not {type(value).__name__}", field=field)
    if len(value) > max_len:
        raise InvalidFieldError(f"must be at most {max_len} characters, got {len(value)}", field=field)
    if printable and not value.isprintable():
        raise InvalidFieldError("must contain only printable characters", field=field)
    return _check_utf8(str(value), field)  # str(): plain str even for str subclasses (enums)


def _check_pattern(value: object, field: str, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidFieldError(f"{_short_repr(value)} is invalid: must be {rule}", field=field)
    return str(value)


def _check_model_name(value: object, field: str) -> str:
    return validate_identifier(value, "model name", field=field)


def _path(parent: str, key: str) -> str:
    return f"{parent}.{key}" if _SIMPLE_KEY_RE.fullmatch(key) else f"{parent}[{_short_repr(key, 40)}]"


def _plain(value: object, field: str, depth: int = 0) -> Any:
    """Deep-copy ``value`` as plain JSON-compatible data, or raise naming the offending path."""
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        if not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            raise InvalidFieldError("int outside the 64-bit range msgpack can carry", field=field)
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise InvalidFieldError(f"{value!r} is not allowed (finite floats only)", field=field)
        return value
    if type(value) is str:
        return _check_utf8(value, field)
    if depth >= MAX_NESTING:
        raise InvalidFieldError(f"nested deeper than {MAX_NESTING} levels", field=field)
    if isinstance(value, (list, tuple)):
        flat = _flat_numbers(value)
        if flat is not None:
            return flat
        return [_plain(item, f"{field}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return _plain_map(value, field, depth)
    raise InvalidFieldError(
        f"{type(value).__name__} is not plain data (None, bool, int, float, str, list, map)", field=field
    )


def _flat_numbers(value: list[Any] | tuple[Any, ...]) -> list[Any] | None:
    """Fast path for the bulk of telemetry (histogram counts and edges): a flat list of finite floats, in-range
    ints and None/bools is copied without building a field path per item. ``None`` means: take the slow path
    (nested data, strings, or something invalid, which the slow path then names precisely)."""
    lo, hi = _MSGPACK_INT_MIN, _MSGPACK_INT_MAX
    for item in value:
        t = type(item)
        if t is float:
            if item - item != 0.0:  # NaN or ±inf
                return None
        elif t is int:
            if not lo <= item <= hi:
                return None
        elif item is not None and t is not bool:
            return None
    return list(value)


def _plain_map(value: object, field: str, depth: int = 0) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidFieldError(f"must be a map, not {type(value).__name__}", field=field)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is not str:
            raise InvalidFieldError(f"map key {_short_repr(key, 40)} is not a str", field=field)
        _check_utf8(key, field)
        t = type(item)
        if ((t is float and item - item == 0.0) or (t is int and _MSGPACK_INT_MIN <= item <= _MSGPACK_INT_MAX)
                or item is None or t is bool):
            out[key] = item  # a plain scalar: no path needed (the common case in histogram maps)
        else:
            out[key] = _plain(item, _path(field, key), depth + 1)
    return out


def _set(obj: object, name: str, value: object) -> None:
    """Assign a normalised value to a frozen dataclass field during ``__post_init__``."""
    object.__setattr__(obj, name, value)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """Wire field names of a message class (in declaration order): its dataclass fields minus
    ``schema_version`` and ``extra``. Cached per class."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("schema_version", "extra"))
        _FIELD_NAMES[cls] = names
    return names


def _check_extra(obj: object, extra: object) -> None:
    plain = _plain_map(extra, "extra")
    reserved = set(_field_names(type(obj)))
    if isinstance(obj, _Wire):  # nested ModelState maps have no envelope
        reserved |= ENVELOPE_KEYS
    clash = sorted(reserved.intersection(plain))
    if clash:
        raise InvalidFieldError(f"keys {clash} are reserved (known fields or envelope)", field="extra")
    _set(obj, "extra", plain)


def _check_schema_version(value: object, field: str = "v") -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DecodeError(f"must be a [major, minor] pair, not {_short_repr(value)}", field=field)
    major, minor = value
    if type(major) is not int or type(minor) is not int or major < 0 or minor < 0:
        raise DecodeError(f"must be two non-negative ints, not {_short_repr(value)}", field=field)
    if major != SCHEMA_VERSION[0]:
        raise UnsupportedSchemaVersionError((major, minor), SCHEMA_VERSION)
    return major, minor


# --------------------------------------------------------------------------------------------------
# Message classes
# --------------------------------------------------------------------------------------------------


class _Wire:
    """Shared decoding/validation for the message dataclasses (mixin: no fields of its own)."""

    __slots__ = ()

    TYPE_TAG: ClassVar[str]
    """The ``"t"`` value identifying the type on the wire."""
    CHANNEL: ClassVar[Channel]
    """The channel this message type is published on."""

    def _validate_common(self, schema_version: object, extra: object) -> None:
        _set(self, "schema_version", _check_schema_version(schema_version, "schema_version"))
        _check_extra(self, extra)

    @classmethod
    def _convert_wire(cls, fields: dict[str, Any]) -> None:
        """Hook: turn nested wire structures into field values (``Status.models``) in place."""

    @classmethod
    def _from_wire(cls, data: Mapping[str, Any], version: tuple[int, int]) -> Self:
        known = _field_names(cls)
        fields: dict[str, Any] = {}
        for name in known:
            if name not in data:
                raise DecodeError(f"missing required field in {cls.TYPE_TAG!r} message", field=name)
            fields[name] = data[name]
        cls._convert_wire(fields)
        fields["schema_version"] = version
        fields["extra"] = {k: v for k, v in data.items() if k not in known and k not in ENVELOPE_KEYS}
        return cls(**fields)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelState:
    """One deployed model as reported in :class:`Status` (nested map inside ``models``).

    Keeps unknown keys in ``extra`` like a top-level message, so newer minors may add per-model fields.
    """

    name: str
    """Model name (identifier rules)."""
    version: int
    """Model version, an int >= 0."""
    slot: str | None
    """Deployment slot holding it (identifier rules), or ``None`` if not slotted."""
    healthy: bool
    """Whether the agent considers the model healthy (loaded, passing checks)."""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Unknown keys from a newer minor version, preserved for re-encoding."""

    def __post_init__(self) -> None:
        _set(self, "name", _check_model_name(self.name, "name"))
        _check_int(self.version, "version")
        if self.slot is not None:
            _set(self, "slot", validate_identifier(self.slot, "slot name", field="slot"))
        _check_bool(self.healthy, "healthy")
        _check_extra(self, self.extra)

    def to_wire(self) -> dict[str, Any]:
        """The nested map for this model: its fields plus ``extra``."""
        return {"name": self.name, "version": self.version, "slot": self.slot,
                "healthy": self.healthy, **self.extra}

    @classmethod
    def from_wire(cls, data: object) -> ModelState:
        """Build from a decoded nested map (unknown keys go to ``extra``)."""
        if not isinstance(data, Mapping):
            raise DecodeError(f"must be a map, not {type(data).__name__}")
        known = _field_names(cls)
        missing = [name for name in known if name not in data]
        if missing:
            raise DecodeError("missing required field", field=missing[0])
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{name: data[name] for name in known}, extra=extra)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(_Wire):
    """Periodic liveness ping (channel ``heartbeat``). Not sequenced: only the latest one matters."""

    TYPE_TAG: ClassVar[str] = "heartbeat"
    CHANNEL: ClassVar[Channel] = Channel.HEARTBEAT

    device_id: str
    sent_at: float
    """Device wall clock when sent, unix seconds."""
    uptime_s: float
    """Seconds since the agent started."""
    schema_version: tuple[int, int] = SCHEMA_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _set(self, "device_id", validate_device_id(self.device_id))
        _set(self, "sent_at", _check_float(self.sent_at, "sent_at"))
        _set(self, "uptime_s", _check_float(self.uptime_s, "uptime_s"))
        self._validate_common(self.schema_version, self.extra)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Status(_Wire):
    """The device's current state (channel ``status``, **retained**). Published on connect and on every
    change; the MQTT last will is :meth:`offline`, so the retained value turns ``offline`` when the
    device drops off without saying goodbye."""

    TYPE_TAG: ClassVar[str] = "status"
    CHANNEL: ClassVar[Channel] = Channel.STATUS

    device_id: str
    state: StatusState
    agent_version: str
    """Version string of the agent software, at most 64 printable characters ("" if unknown)."""
    models: tuple[ModelState, ...] = ()
    """The models deployed on the device."""
    sent_at: float | None
    """Device wall clock when sent, unix seconds; ``None`` for the last will (composed at connect
    time, published later by the broker, so no honest timestamp exists)."""
    schema_version: tuple[int, int] = SCHEMA_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _set(self, "device_id", validate_device_id(self.device_id))
        if self.state not in _STATUS_STATES:
            raise InvalidFieldError(f"{_short_repr(self.state)} is not 'online' or 'offline'", field="state")
        _set(self, "agent_version", _check_text(self.agent_version, "agent_version",
                                                max_len=MAX_AGENT_VERSION_LEN, printable=True))
        if not isinstance(self.models, (list, tuple)):
            raise InvalidFieldError(f"must be a sequence of ModelState, not {type(self.models).__name__}",
                                    field="models")
        for i, model in enumerate(self.models):
            if not isinstance(model, ModelState):
                raise InvalidFieldError(
                    f"must be a ModelState, not {type(model).__name__}", field=f"models[{i}]"
                )
        _set(self, "models", tuple(self.models))
        if self.sent_at is not None:
            _set(self, "sent_at", _check_float(self.sent_at, "sent_at"))
        self._validate_common(self.schema_version, self.extra)

    @classmethod
    def offline(cls, device_id: str, *, agent_version: str = "") -> Status:
        """The last-will message: ``state="offline"``, no models, no timestamp."""
        return cls(device_id=device_id, state="offline", agent_version=agent_version, models=(), sent_at=None)

    @classmethod
    def _convert_wire(cls, fields: dict[str, Any]) -> None:
        models = fields["models"]
        if not isinstance(models, list):
            raise DecodeError(f"must be a list of maps, not {type(models).__name__}", field="models")
        converted: list[ModelState] = []
        for i, item in enumerate(models):
            try:
                converted.append(ModelState.from_wire(item))
            except DecodeError as err:
                raise err.with_prefix(f"models[{i}]") from err
        fields["models"] = converted


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event(_Wire):
    """Something that happened on the device (channel ``events``, stream ``events``, sequenced).

    ``kind`` is a free word matching ``[a-z_]{1,32}``; the deployment-event vocabulary and its rules are
    in :mod:`agent.protocol.deploy` (:class:`~agent.protocol.deploy.DeployEvent`,
    :func:`~agent.protocol.deploy.validate_deploy_event`). The optional fields say which command/model it
    concerns, ``detail`` carries plain data.
    """

    TYPE_TAG: ClassVar[str] = "event"
    CHANNEL: ClassVar[Channel] = Channel.EVENTS

    device_id: str
    stream_seq: int
    """Sequence number on the device's ``events`` stream (0, 1, 2, ...)."""
    kind: str
    at: float
    """When it happened, device wall clock, unix seconds."""
    command_id: str | None = None
    """The server command this event answers, if any (1-128 of ``A-Z a-z 0-9 . _ : -``)."""
    model: str | None = None
    version: int | None = None
    reason: str | None = None
    """Why it happened, at most 1024 characters. Deployment events put a short stable code here
    (``signature``, ``crash_loop``...) and human text in ``detail["message"]``."""
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    schema_version: tuple[int, int] = SCHEMA_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _set(self, "device_id", validate_device_id(self.device_id))
        validate_seq(self.stream_seq, "stream_seq")
        _set(self, "kind", _check_pattern(self.kind, "kind", _EVENT_KIND_RE, "1-32 characters of a-z or '_'"))
        _set(self, "at", _check_float(self.at, "at"))
        if self.command_id is not None:
            _set(self, "command_id", _check_pattern(
                self.command_id, "command_id", _COMMAND_ID_RE,
                "1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-', starting alphanumeric"))
        if self.model is not None:
            _set(self, "model", _check_model_name(self.model, "model"))
        if self.version is not None:
            _check_int(self.version, "version")
        if self.reason is not None:
            _set(self, "reason", _check_text(self.reason, "reason", max_len=MAX_REASON_LEN, printable=False))
        _set(self, "detail", _plain_map(self.detail, "detail"))
        self._validate_common(self.schema_version, self.extra)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DriftWindow(_Wire):
    """Input/output statistics of one model over one time window (channel ``drift``, stream ``drift``).

    ``features`` maps feature name to that feature's histogram in the drift package's ``to_dict``
    layout; this contract treats it as opaque plain data. ``replaces`` (inclusive seq range, all
    before ``stream_seq``) says this window merges earlier windows, which the server should supersede.
    """

    TYPE_TAG: ClassVar[str] = "drift_window"
    CHANNEL: ClassVar[Channel] = Channel.DRIFT

    device_id: str
    stream_seq: int
    """Sequence number on the device's ``drift`` stream."""
    model: str
    version: int
    window_start: float
    """Unix seconds, inclusive."""
    window_end: float
    """Unix seconds, ``>= window_start``."""
    samples: int
    """Number of inferences summarised."""
    replaces: SeqRange | None = None
    features: Mapping[str, Mapping[str, Any]] = dataclasses.field(hash=False)
    slis: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """Service-level indicators over the window (latency percentiles, error counts...), plain data."""
    schema_version: tuple[int, int] = SCHEMA_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _set(self, "device_id", validate_device_id(self.device_id))
        validate_seq(self.stream_seq, "stream_seq")
        _set(self, "model", _check_model_name(self.model, "model"))
        _check_int(self.version, "version")
        _set(self, "window_start", _check_float(self.window_start, "window_start"))
        _set(self, "window_end", _check_float(self.window_end, "window_end"))
        if self.window_end < self.window_start:
            raise InvalidFieldError(
                f"window_end {self.window_end} is before window_start {self.window_start}", field="window_end"
            )
        _check_int(self.samples, "samples")
        if self.replaces is not None:
            (first, last), = validate_ranges([self.replaces], "replaces")
            if last >= self.stream_seq:
                raise InvalidFieldError(
                    f"can only replace earlier windows: {last} is not before stream_seq {self.stream_seq}",
                    field="replaces",
                )
            _set(self, "replaces", (first, last))
        features = _plain_map(self.features, "features")
        for name, hist in features.items():
            if not isinstance(hist, dict):
                raise InvalidFieldError(
                    f"must be a map, not {type(hist).__name__}", field=_path("features", name)
                )
        _set(self, "features", features)
        _set(self, "slis", _plain_map(self.slis, "slis"))
        self._validate_common(self.schema_version, self.extra)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ack(_Wire):
    """Server -> device acknowledgement for one stream (channel ``acks``).

    ``seqs``: inclusive ranges the server has **durably stored**; the device may now drop them from its
    outbox. ``missing``: ranges the server has not seen and asks the device to resend. Both are sorted,
    disjoint and do not overlap each other.
    """

    TYPE_TAG: ClassVar[str] = "ack"
    CHANNEL: ClassVar[Channel] = Channel.ACKS

    device_id: str
    stream: str
    """Stream name (``"events"``, ``"drift"``; identifier rules so newer streams decode)."""
    seqs: tuple[SeqRange, ...]
    missing: tuple[SeqRange, ...] = ()
    schema_version: tuple[int, int] = SCHEMA_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _set(self, "device_id", validate_device_id(self.device_id))
        _set(self, "stream", validate_identifier(self.stream, "stream name", field="stream"))
        _set(self, "seqs", validate_ranges(self.seqs, "seqs"))
        _set(self, "missing", validate_ranges(self.missing, "missing"))
        _check_disjoint(self.seqs, self.missing)
        self._validate_common(self.schema_version, self.extra)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Command(_Wire):
    """Server -> device instruction (channel ``commands``): deploy a model version, or cancel a deployment.

    ``order`` is the signed deployment-order **document** ``{"signed": {...}, "signatures": [...]}`` of
    ``docs/bundle-format.md``, carried as opaque plain data: this contract only checks that it is
    JSON-compatible; the agent verifies it with ``agent.bundle``. The other fields are unauthenticated
    routing data (the agent acts only on the verified ``order["signed"]``, and rejects a command whose
    ``command_id``, ``kind`` or ``device_id`` disagree with it).

    Delivery: the server resends the same ``command_id`` (same ``order``; ``sent_at`` may change) until
    the device answers with an :class:`Event` carrying that ``command_id`` or the order expires. The
    device applies each ``command_id`` once: it recognises a repeat by ``command_id`` before the order's
    replay (sequence) check, never runs a finished command again (it may repeat its recorded answer) and
    continues, rather than restarts, one it is still working on.

    Values survive the codec unchanged in type and value (ints stay ints, floats floats, strings strings,
    arrays lists), so ``canonical_json(order["signed"])`` after :func:`~agent.protocol.codec.decode` is
    the same byte string the server signed.
    """

    TYPE_TAG: ClassVar[str] = "command"
    CHANNEL: ClassVar[Channel] = Channel.COMMANDS

    device_id: str
    command_id: str
    """Identifies the command (identifier rule); equals ``order["signed"]["command_id"]``. Events
    answering it carry it in ``Event.command_id``."""
    kind: CommandKind
    """``"deploy"`` or ``"cancel"``; equals ``order["signed"]["action"]``."""
    order: Mapping[str, Any] = dataclasses.field(hash=False)
    """The signed deployment-order document, opaque plain data (verified by ``agent.bundle``)."""
    sent_at: float
    """Server wall clock when this copy was sent, unix seconds (resends carry a new value)."""
    schema_version: tuple[int, int] = SCHEMA_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _set(self, "device_id", validate_device_id(self.device_id))
        _set(self, "command_id", validate_identifier(self.command_id, "command id", field="command_id"))
        if not isinstance(self.kind, str) or self.kind not in COMMAND_KINDS:
            raise InvalidFieldError(f"{_short_repr(self.kind)} is not 'deploy' or 'cancel'", field="kind")
        _set(self, "kind", str(self.kind))
        _set(self, "order", _plain_map(self.order, "order"))
        _set(self, "sent_at", _check_float(self.sent_at, "sent_at"))
        self._validate_common(self.schema_version, self.extra)


def _check_disjoint(stored: tuple[SeqRange, ...], missing: tuple[SeqRange, ...]) -> None:
    i = j = 0
    while i < len(stored) and j < len(missing):
        (a, b), (c, d) = stored[i], missing[j]
        if a <= d and c <= b:
            raise InvalidFieldError(
                f"range {[c, d]} is also acknowledged as stored in {[a, b]}", field="missing"
            )
        if b < d:
            i += 1
        else:
            j += 1


Message: TypeAlias = Heartbeat | Status | Event | DriftWindow | Ack | Command
"""Any message of the contract."""

MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = MappingProxyType(
    {cls.TYPE_TAG: cls for cls in (Heartbeat, Status, Event, DriftWindow, Ack, Command)}
)
"""Registry: type tag -> class. ``from_wire``/``decode`` dispatch through it."""

_MESSAGE_CLASSES: Final = tuple(MESSAGE_TYPES.values())


def _wire_value(value: object) -> Any:
    if isinstance(value, ModelState):
        return value.to_wire()
    if isinstance(value, (list, tuple)):
        return [_wire_value(item) for item in value]
    return value


def to_wire(msg: Message) -> dict[str, Any]:
    """The plain map for ``msg``: ``"t"``, ``"v"``, every field, and ``extra`` merged in.

    Keys are not yet in canonical (sorted) order; the codec sorts them when it serialises.
    """
    if not isinstance(msg, _MESSAGE_CLASSES):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    wire: dict[str, Any] = {"t": msg.TYPE_TAG, "v": list(msg.schema_version)}
    for name in _field_names(type(msg)):
        wire[name] = _wire_value(getattr(msg, name))
    wire.update(msg.extra)
    return wire


def from_wire(data: object) -> Message:
    """Build a message from a decoded plain map (the output of msgpack or JSON parsing).

    Checks the version first (a newer major may have changed anything, including the type tags), then
    dispatches on ``"t"``. Raises :class:`DecodeError` (field named), :class:`InvalidFieldError`,
    :class:`UnsupportedSchemaVersionError` or :class:`UnknownMessageTypeError`.
    """
    if not isinstance(data, Mapping):
        raise DecodeError(f"a message must be a map, not {type(data).__name__}")
    if "v" not in data:
        raise DecodeError("missing schema version", field="v")
    version = _check_schema_version(data["v"])
    if "t" not in data:
        raise DecodeError("missing message type tag", field="t")
    tag = data["t"]
    if not isinstance(tag, str):
        raise DecodeError(f"must be a str, not {type(tag).__name__}", field="t")
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise UnknownMessageTypeError(tag)
    return cls._from_wire(data, version)


def message_topic(msg: Message) -> str:
    """The topic ``msg`` is published on: ``fleet/v1/{msg.device_id}/{channel of its type}``."""
    return device_topic(msg.device_id, msg.CHANNEL)
