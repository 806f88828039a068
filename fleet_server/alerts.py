"""Drift and SLI alerts: a pure policy that decides, and a webhook notifier that delivers.

:class:`AlertPolicy` (pure; the clock is passed in) takes one observation per evaluation, per
(model, version, feature): a drift level from ``agent.drift`` scores, or an SLI value against warn/alert
thresholds. Each key goes through ``agent.drift.Hysteresis`` (a level must hold for ``rise_after`` qualifying
evaluations before the state rises, ``fall_after`` before it falls; evaluations with too few samples are
ignored), so a noisy signal around a threshold cannot flap. When the debounced state rises to a notified level
an :class:`Alert` is produced, unless the same key fired less than ``cooldown_s`` ago (seed failure F6:
retraining/rollout thrash). When it falls back to ``ok`` a ``resolved`` alert follows (if one had fired).

:class:`WebhookNotifier` POSTs each alert as JSON to every configured URL, signed with HMAC-SHA256 of the exact
body under the shared secret (``X-Fleet-Signature: sha256=<hex>``, GitHub style; :func:`verify_signature` is the
receiver's check). The body carries a unique ``id`` and ``sent_at`` so receivers can drop replays and duplicates.
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter (``Retry-After`` is
honoured, capped); other 4xx are not retried. httpx is injected through its transport, so tests use a real
local HTTP receiver or a mock transport.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
import sqlalchemy as sa
from sqlmodel import Session

from agent.drift import (
    DriftLayoutError,
    DriftReport,
    DriftThresholds,
    Hysteresis,
    HysteresisState,
    Level,
    StateLevel,
    Summary,
    score_summary,
)
from fleet_server.models import Baseline, table_of
from fleet_server.settings import FleetSettings
from fleet_server.telemetry import load_merged

__all__ = [
    "SIGNATURE_HEADER",
    "Alert",
    "AlertPolicy",
    "Delivery",
    "SliThresholds",
    "WebhookNotifier",
    "evaluate_drift",
    "sign",
    "verify_signature",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fleet-Signature"
_RANK = {"ok": 0, "warn": 1, "alert": 2}
_MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class Alert:
    """One notification. ``state`` is the new debounced level (``ok`` with ``resolved=True`` when it clears)."""

    kind: Literal["drift", "sli"]
    model: str
    version: int
    feature: str
    """Drift: the feature name; SLI: the SLI name."""
    state: StateLevel
    previous: StateLevel
    resolved: bool
    at: float
    value: float | None
    """The driving score (drift) or the SLI value, at the evaluation that changed the state."""
    metric: str
    samples: int
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SliThresholds:
    """An SLI is ``warn`` at ``value >= warn`` and ``alert`` at ``value >= alert`` (e.g. p99 latency, error rate)."""

    warn: float
    alert: float

    def level(self, value: float) -> StateLevel:
        return "alert" if value >= self.alert else "warn" if value >= self.warn else "ok"


class AlertPolicy:
    """Hysteresis + cooldown per (model, version, feature). ``notify`` lists the levels that send an alert."""

    def __init__(self, *, cooldown_s: float, rise_after: int = 2, fall_after: int = 3, min_samples: int = 200,
                 notify: Iterable[StateLevel] = ("alert",), notify_resolved: bool = True) -> None:
        self.cooldown_s = cooldown_s
        self.notify = frozenset(notify)
        self.notify_resolved = notify_resolved
        self._hysteresis = Hysteresis(rise_after=rise_after, fall_after=fall_after, min_samples=min_samples)
        self._states: dict[tuple[str, str, int, str], HysteresisState] = {}
        self._last_fired: dict[tuple[str, str, int, str], float] = {}
        self._open: set[tuple[str, str, int, str]] = set()
        self.suppressed = 0
        """Alerts not sent because of the cooldown."""

    def state(self, kind: str, model: str, version: int, feature: str) -> StateLevel:
        st = self._states.get((kind, model, version, feature))
        return st.level if st is not None else "ok"

    def observe(self, kind: Literal["drift", "sli"], model: str, version: int, feature: str, *, level: Level,
                samples: int, value: float | None, metric: str, now: float) -> Alert | None:
        """One evaluation of one key: its level (``insufficient`` or too few ``samples``: ignored), the driving
        value for the record, and ``now``. Returns the alert to send, if any."""
        key = (kind, model, version, feature)
        before = self._states.get(key, HysteresisState())
        after = self._hysteresis.step(before, level, samples)
        self._states[key] = after
        if not after.changed:
            return None
        rising = _RANK[after.level] > _RANK[before.level]
        if rising and after.level in self.notify:
            last = self._last_fired.get(key)
            if last is not None and now - last < self.cooldown_s:
                self.suppressed += 1
                return None
            self._last_fired[key] = now
            self._open.add(key)
            return Alert(kind, model, version, feature, after.level, before.level, False, now, value, metric, samples)
        if after.level == "ok" and key in self._open:
            self._open.discard(key)
            if self.notify_resolved:
                return Alert(kind, model, version, feature, "ok", before.level, True, now, value, metric, samples)
        return None

    def observe_report(self, model: str, version: int, report: DriftReport, now: float) -> list[Alert]:
        """One evaluation of the drift of ``model``/``version`` (a report against the baseline)."""
        out = []
        for f in report.features:
            alert = self.observe("drift", model, version, f.feature, level=f.level, samples=f.samples,
                                 value=f.score(report.metric), metric=report.metric, now=now)
            if alert is not None:
                out.append(alert)
        return out

    def observe_sli(self, model: str, version: int, name: str, *, value: float, thresholds: SliThresholds,
                    samples: int, now: float) -> Alert | None:
        """One evaluation of an SLI (``samples``: how many requests the value summarises)."""
        return self.observe("sli", model, version, name, level=thresholds.level(value), samples=samples,
                             value=value, metric=name, now=now)


def sign(secret: str | bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of body>``: the ``X-Fleet-Signature`` value."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """The receiver's check (constant time)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of delivering one alert to one URL."""

    url: str
    ok: bool
    attempts: int
    status: int | None
    error: str = ""


class WebhookNotifier:
    """Deliver alerts to webhook URLs (signed, retried). ``transport`` lets tests substitute the network."""

    def __init__(self, urls: Sequence[str], secret: str, *, timeout_s: float = 5.0, max_attempts: int = 5,
                 backoff_s: float = 1.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random) -> None:
        self.urls = tuple(urls)
        self._secret = secret
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._client = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)

    @classmethod
    def from_settings(cls, settings: FleetSettings, **kw: Any) -> WebhookNotifier | None:
        if not settings.alerts_webhook_urls or settings.alerts_webhook_secret is None:
            return None
        return cls(settings.alerts_webhook_urls, settings.alerts_webhook_secret, timeout_s=settings.alerts_timeout_s,
                   max_attempts=settings.alerts_max_attempts, backoff_s=settings.alerts_backoff_s, **kw)

    def close(self) -> None:
        self._client.close()

    def body(self, alert: Alert) -> bytes:
        doc = {"id": uuid.uuid4().hex, "type": f"{alert.kind}.{'resolved' if alert.resolved else alert.state}",
               "sent_at": self._clock(), "alert": alert.to_dict()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def send(self, alert: Alert) -> list[Delivery]:
        """Deliver ``alert`` to every URL (the same body, so the same id, on every retry)."""
        body = self.body(alert)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self._secret, body),
                   "User-Agent": "fleet-server-alerts"}
        return [self._deliver(url, body, headers) for url in self.urls]

    def _deliver(self, url: str, body: bytes, headers: dict[str, str]) -> Delivery:
        status: int | None = None
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                r = self._client.post(url, content=body, headers=headers)
                status = r.status_code
                if r.is_success:
                    return Delivery(url, True, attempt, status)
                error = f"HTTP {status}"
                if status != 429 and status < 500:
                    break  # the receiver refuses this request; resending it cannot help
                retry_after = _retry_after(r.headers.get("Retry-After"))
            except httpx.HTTPError as exc:  # connection refused, timeout, protocol error
                status, error = None, f"{type(exc).__name__}: {exc}"
            if attempt < self.max_attempts:
                delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + 0.5 * self._jitter())
                self._sleep(retry_after if retry_after is not None else delay)
        log.error("alerts: delivery to %s failed after %d attempts: %s", url, attempt, error)
        return Delivery(url, False, attempt, status, error)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def evaluate_drift(session: Session, policy: AlertPolicy, *, now: float, window_s: float) -> list[Alert]:
    """One evaluation round: for every model version with a baseline, merge the last ``window_s`` seconds of
    windows from all devices, score them and feed the policy. Returns the alerts to send (the caller sends them
    with a :class:`WebhookNotifier`, outside any transaction)."""
    alerts: list[Alert] = []
    t = table_of(Baseline)
    for row in session.execute(sa.select(t).order_by(t.c.model, t.c.version)).mappings():
        merged = load_merged(session, model=row["model"], version=row["version"], devices=None,
                             since=now - window_s, until=now)
        if merged.summary is None:
            continue
        try:
            report = score_summary(Summary.from_dict(row["summary"]), merged.summary,
                                   DriftThresholds.from_dict(row["thresholds"]))
        except DriftLayoutError as exc:
            log.error("alerts: cannot score %s/%s against its baseline: %s", row["model"], row["version"], exc)
            continue
        alerts += policy.observe_report(row["model"], row["version"], report, now)
    return alerts
