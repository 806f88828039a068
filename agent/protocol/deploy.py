"""The deployment-event vocabulary: the :class:`~agent.protocol.messages.Event` kinds with which a device
reports what it does with a :class:`~agent.protocol.messages.Command`, and the rules they follow.

A deployment (one ``deploy`` command) normally goes::

    received -> downloading -> verified -> installed -> healthy

and ends early with ``rejected`` (the order or the bundle is not acceptable: retrying the same command
cannot help), ``failed`` (acceptable but could not be completed: download error, no space...),
``rolled_back`` (activated, then abandoned for the previous version) or ``cancelled`` (stopped by a
``cancel`` command before it was installed). A ``cancel`` command is answered under its own
``command_id`` with ``received`` and then ``cancelled`` (it took effect) or ``rejected`` (for example
``too_late``: its target was already installed). Every command thus ends with an answer under its own id.

Rules (checked by :func:`validate_deploy_event`):

* ``kind`` is one of :class:`DeployEvent`.
* ``command_id`` names the command the event is about and follows the identifier rule. It may be
  ``None`` only when the agent acts on its own (a crash-loop rollback, say), and then ``reason`` says
  why. ``received`` and ``cancelled`` always answer a command, so they always carry one.
* ``failed``, ``rolled_back`` and ``rejected`` carry a ``reason``.
* ``reason``, when present, is a short stable code matching :data:`REASON_CODE_PATTERN` (the known ones
  are :class:`DeployReason`; receivers treat an unknown code like any other failure). Text for humans
  goes in ``detail["message"]`` (a str of at most 1024 characters).
* The optional links ``detail["cancels"]`` (on a cancel command's ``cancelled``) and
  ``detail["cancelled_by"]`` (on a stopped deployment's ``cancelled``) are command ids when present.
* ``model``/``version`` name the model version the deployment installs, when known (for
  ``rolled_back``, the version that was abandoned; ``detail["restored_version"]`` is the one serving).

The rules are a helper, not part of :class:`~agent.protocol.messages.Event` validation: events are
sequenced, so a server stores and acknowledges one that breaks them (otherwise the device would resend
it forever) and counts the violation.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from agent.protocol.errors import InvalidFieldError, _short_repr
from agent.protocol.messages import MAX_REASON_LEN, Event
from agent.protocol.topics import validate_identifier

__all__ = [
    "DEPLOY_EVENT_KINDS",
    "DEPLOY_KINDS_REQUIRING_COMMAND",
    "DEPLOY_KINDS_REQUIRING_REASON",
    "DEPLOY_REASONS",
    "REASON_CODE_PATTERN",
    "DeployEvent",
    "DeployReason",
    "is_deploy_event",
    "validate_deploy_event",
]


class DeployEvent(enum.StrEnum):
    """``Event.kind`` values that report on a deployment."""

    RECEIVED = "received"
    """A command with a new ``command_id`` arrived. Acknowledges the command: the server stops resending."""
    DOWNLOADING = "downloading"
    """The bundle download started."""
    VERIFIED = "verified"
    """Order and bundle verified (signatures, digest, size, version rule, compatibility)."""
    INSTALLED = "installed"
    """The new version is activated and serving."""
    HEALTHY = "healthy"
    """The new version passed its health checks and soak: the deployment succeeded."""
    FAILED = "failed"
    """The deployment was acceptable but could not be completed (``reason`` required)."""
    ROLLED_BACK = "rolled_back"
    """The activated version was abandoned for the previous one (``reason`` required)."""
    REJECTED = "rejected"
    """The order or the bundle is not acceptable; nothing was activated (``reason`` required)."""
    CANCELLED = "cancelled"
    """Under a deployment's id: a cancel stopped it before it was installed. Under a cancel command's id:
    the cancel took effect."""


class DeployReason(enum.StrEnum):
    """Known ``Event.reason`` codes of deployment events. The set is open: newer agents may add codes."""

    SIGNATURE = "signature"
    """Order or bundle signatures invalid or below threshold, or the trust root is expired."""
    DIGEST = "digest"
    """A payload file's SHA-256, or the bundle digest, differs from what was signed."""
    ROLLBACK = "rollback"
    """The version rule refused a downgrade the order does not allow."""
    STALE = "stale"
    """The order, token or manifest has expired, or the order's sequence is not new (replay)."""
    INCOMPATIBLE = "incompatible"
    """The bundle does not support this device's firmware profile or runtime."""
    HEALTH_CHECK = "health_check"
    """The model failed its health check (expected outputs, latency budget, error rate)."""
    CRASH_LOOP = "crash_loop"
    """The model kept crashing after activation; the agent rolled back on its own."""
    ORDER = "order"
    """The order is inconsistent: another device, disagreeing with the command or with the bundle."""
    SIZE = "size"
    """A size limit was exceeded, or the download's length differs from ``bundle_length``."""
    BAD_MEMBER = "bad_member"
    """The bundle archive has an unexpected, missing, extra or non-regular member."""
    MALFORMED = "malformed"
    """The order or manifest cannot be parsed, or is not canonical."""
    DOWNLOAD = "download"
    """The bundle could not be downloaded (network, HTTP error, token refused)."""
    NO_SPACE = "no_space"
    """Not enough storage for the bundle."""
    TOO_LATE = "too_late"
    """A cancel command arrived after its deployment was installed or had finished (``rejected``)."""
    TRUST_ROOT = "trust_root"
    """A trust-root rotation was refused (not signed by a threshold of the old and the new root keys)."""
    LATENCY = "latency"
    """The health check's median latency was over the bundle's budget (``rolled_back``)."""
    SOAK = "soak"
    """The live runtime error rate during the soak window was over budget (``rolled_back``)."""
    LOAD_FAILED = "load_failed"
    """The runtime could not load the new model (``rolled_back``)."""
    IO = "io"
    """A disk error (ENOSPC, EIO) interrupted the install; the device was put back as it was."""
    INTERRUPTED = "interrupted"
    """The agent stopped (crash, power loss) before the install switched models; nothing changed (``failed``)."""
    STORAGE = "storage"
    """The active slot no longer matches its manifest (storage corruption); the previous slot serves again."""
    DISABLED = "disabled"
    """Bundle installs are disabled on this device (no trust root configured)."""


REASON_CODE_PATTERN: Final = r"[a-z_]{1,32}"
"""Shape of a deployment event's ``reason`` code (the same rule as event kinds), matched in full."""

DEPLOY_EVENT_KINDS: Final[frozenset[str]] = frozenset(kind.value for kind in DeployEvent)
"""Every deployment event kind."""

DEPLOY_KINDS_REQUIRING_REASON: Final[frozenset[str]] = frozenset(
    {DeployEvent.FAILED.value, DeployEvent.ROLLED_BACK.value, DeployEvent.REJECTED.value}
)
"""Kinds that must carry a ``reason`` code."""

DEPLOY_KINDS_REQUIRING_COMMAND: Final[frozenset[str]] = frozenset(
    {DeployEvent.RECEIVED.value, DeployEvent.CANCELLED.value}
)
"""Kinds that always answer a command, so ``command_id`` is never ``None``."""

DEPLOY_REASONS: Final[frozenset[str]] = frozenset(reason.value for reason in DeployReason)
"""The known reason codes."""

_REASON_CODE_RE: Final = re.compile(REASON_CODE_PATTERN)


def is_deploy_event(event: Event) -> bool:
    """True if ``event.kind`` belongs to the deployment vocabulary."""
    return event.kind in DEPLOY_EVENT_KINDS


def validate_deploy_event(event: Event) -> Event:
    """Return ``event`` if it follows the deployment-event rules (module docstring), else raise
    :class:`~agent.protocol.errors.InvalidFieldError` naming the field (``kind``, ``command_id``,
    ``reason``, ``detail.message``, ``detail.cancels`` or ``detail.cancelled_by``)."""
    if not isinstance(event, Event):
        raise TypeError(f"not an Event: {type(event).__name__}")
    if event.kind not in DEPLOY_EVENT_KINDS:
        allowed = ", ".join(kind.value for kind in DeployEvent)
        raise InvalidFieldError(f"{event.kind!r} is not a deployment event kind ({allowed})", field="kind")
    if event.reason is not None and _REASON_CODE_RE.fullmatch(event.reason) is None:
        raise InvalidFieldError(
            f"{_short_repr(event.reason)} is not a reason code: must be 1-32 characters of a-z or '_' "
            "(put text for humans in detail['message'])",
            field="reason",
        )
    if event.reason is None and event.kind in DEPLOY_KINDS_REQUIRING_REASON:
        raise InvalidFieldError(f"a {event.kind!r} event must carry a reason code", field="reason")
    if event.command_id is not None:
        validate_identifier(event.command_id, "command id", field="command_id")
    elif event.kind in DEPLOY_KINDS_REQUIRING_COMMAND:
        raise InvalidFieldError(f"a {event.kind!r} event must carry the command_id it answers", field="command_id")
    elif event.reason is None:
        raise InvalidFieldError(
            "is None: a deployment event the agent emits on its own must say why in reason", field="command_id"
        )
    if "message" in event.detail:
        message = event.detail["message"]
        if not isinstance(message, str):
            raise InvalidFieldError(f"must be a str, not {type(message).__name__}", field="detail.message")
        if len(message) > MAX_REASON_LEN:
            raise InvalidFieldError(
                f"must be at most {MAX_REASON_LEN} characters, got {len(message)}", field="detail.message"
            )
    for link in ("cancels", "cancelled_by"):
        if link in event.detail:
            validate_identifier(event.detail[link], "command id", field=f"detail.{link}")
    return event
