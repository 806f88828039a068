"""Alerts: hysteresis and cooldown decide; webhooks are signed and retried (against a real local HTTP server)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from fleet_server.alerts import (
    SIGNATURE_HEADER,
    Alert,
    AlertPolicy,
    SliThresholds,
    WebhookNotifier,
    evaluate_drift,
    verify_signature,
)
from fleet_server.db import session_factory
from fleet_server.ingest import BatchWriter
from fleet_server.settings import FleetSettings
from tests.server.support import AUTH, T0, WINDOW_S, baseline, frame, window

SECRET = "webhook-secret-0123456789"


def run(policy: AlertPolicy, levels: list[str], *, start: float = 0.0, step: float = 60.0, samples: int = 1000,
        version: int = 1) -> list[Alert]:
    out: list[Alert] = []
    for i, level in enumerate(levels):
        alert = policy.observe("drift", "m", version, "temp", level=level, samples=samples,  # type: ignore[arg-type]
                               value=0.3, metric="psi", now=start + i * step)
        if alert is not None:
            out.append(alert)
    return out


def test_noisy_signal_around_the_threshold_never_triggers() -> None:
    policy = AlertPolicy(cooldown_s=3600, rise_after=2, fall_after=3, min_samples=100)
    assert run(policy, ["alert", "ok"] * 20) == []
    assert policy.state("drift", "m", 1, "temp") == "ok"


def test_small_windows_are_ignored() -> None:
    policy = AlertPolicy(cooldown_s=0, rise_after=2, min_samples=500)
    assert run(policy, ["alert"] * 10, samples=50) == []


def test_sustained_drift_alerts_once_then_resolves() -> None:
    policy = AlertPolicy(cooldown_s=3600, rise_after=2, fall_after=3, min_samples=100)
    alerts = run(policy, ["alert", "alert", "alert", "alert", "ok", "ok", "ok", "ok"])
    assert [(a.state, a.resolved, a.at) for a in alerts] == [("alert", False, 60.0), ("ok", True, 360.0)]
    assert alerts[0].value == 0.3 and alerts[0].metric == "psi" and alerts[0].previous == "ok"


def test_cooldown_suppresses_a_second_alert_for_the_same_feature() -> None:
    policy = AlertPolicy(cooldown_s=3600, rise_after=2, fall_after=2, min_samples=100, notify_resolved=False)
    cycle = ["alert", "alert", "ok", "ok"]
    first = run(policy, cycle * 3, step=60)  # three rises within 12 minutes
    assert len(first) == 1 and policy.suppressed == 2
    later = run(policy, cycle, start=4000)  # after the cooldown
    assert len(later) == 1
    assert len(run(policy, ["alert", "alert"], start=4000, version=2)) == 1  # another version is another key


def test_sli_alerts_use_the_same_rules() -> None:
    policy = AlertPolicy(cooldown_s=600, rise_after=2, min_samples=10)
    thr = SliThresholds(warn=50.0, alert=100.0)
    got = [policy.observe_sli("m", 1, "p99_ms", value=v, thresholds=thr, samples=100, now=t)
           for t, v in enumerate([120.0, 80.0, 130.0, 150.0])]
    fired = [a for a in got if a is not None]
    assert len(fired) == 1 and fired[0].kind == "sli" and fired[0].feature == "p99_ms" and fired[0].value == 150.0


# -- webhooks against a real HTTP server ----------------------------------------------------------------


@dataclass
class Receiver:
    url: str
    statuses: list[int]
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    retry_after: str | None = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(url="", statuses=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            code = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(code)
            if code in (429, 503) and rec.retry_after is not None:
                self.send_header("Retry-After", rec.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


ALERT = Alert("drift", "m", 1, "temp", "alert", "ok", False, T0, 0.31, "psi", 1000)


def notifier(url: str, sleeps: list[float], **kw: Any) -> WebhookNotifier:
    return WebhookNotifier([url], SECRET, timeout_s=2, sleep=sleeps.append, jitter=lambda: 1.0, **kw)


def test_webhook_is_signed_and_retried_with_backoff(receiver: Receiver) -> None:
    receiver.statuses = [500, 503, 200]
    sleeps: list[float] = []
    (d,) = notifier(receiver.url, sleeps, max_attempts=5, backoff_s=0.5).send(ALERT)
    assert d.ok and d.attempts == 3 and d.status == 200
    assert sleeps == [0.5, 1.0]  # exponential
    bodies = {body for _, body in receiver.requests}
    assert len(receiver.requests) == 3 and len(bodies) == 1  # the same delivery (same id) every time
    headers, body = receiver.requests[0]
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature("another-secret-0123456", body, headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature(SECRET, body.replace(b"0.31", b"0.01"), headers[SIGNATURE_HEADER.lower()])
    doc = json.loads(body)
    assert doc["type"] == "drift.alert" and doc["alert"]["feature"] == "temp" and len(doc["id"]) == 32


def test_client_errors_are_not_retried_and_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.statuses = [400]
    sleeps: list[float] = []
    (d,) = notifier(receiver.url, sleeps).send(ALERT)
    assert not d.ok and d.attempts == 1 and d.status == 400 and sleeps == []
    receiver.statuses, receiver.retry_after = [429, 200], "2"
    (d,) = notifier(receiver.url, sleeps).send(ALERT)
    assert d.ok and d.attempts == 2 and sleeps == [2.0]


def test_unreachable_receiver_gives_up_after_max_attempts() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    (d,) = notifier(f"http://127.0.0.1:{port}/hook", sleeps, max_attempts=3, backoff_s=0.1).send(ALERT)
    assert not d.ok and d.attempts == 3 and d.status is None and "ConnectError" in d.error
    assert sleeps == pytest.approx([0.1, 0.2])


def test_notifier_from_settings() -> None:
    assert WebhookNotifier.from_settings(FleetSettings()) is None
    n = WebhookNotifier.from_settings(FleetSettings(alerts_webhook_urls=("https://h/x",),
                                                    alerts_webhook_secret=SECRET, alerts_max_attempts=2))
    assert n is not None and n.urls == ("https://h/x",) and n.max_attempts == 2
    n.close()


def test_evaluation_round_alerts_on_fleet_drift_once(client: TestClient, writer: BatchWriter, engine: Engine,
                                                     receiver: Receiver) -> None:
    base = baseline(features=2, bins=8, categorical=False)
    assert client.put("/api/v1/models/m/versions/1/baseline", headers=AUTH,
                      json={"summary": base.to_dict(), "thresholds": {"min_samples": 100}}).status_code == 200
    policy = AlertPolicy(cooldown_s=3600, rise_after=2, min_samples=100)
    sessions = session_factory(engine)
    sent: list[Alert] = []
    for i in range(6):  # drifted windows arrive every 5 minutes; one evaluation after each
        writer.write([frame(window("cam-0", i, base, rows=300, shift=2.0, seed=i))])
        with sessions() as session:
            sent += evaluate_drift(session, policy, now=T0 + (i + 1) * WINDOW_S, window_s=WINDOW_S)
    assert {(a.feature, a.state) for a in sent} == {("f00", "alert"), ("f01", "alert")}
    deliveries = WebhookNotifier([receiver.url], SECRET).send(sent[0])
    assert deliveries[0].ok and len(receiver.requests) == 1
