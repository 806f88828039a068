"""Deployment orders end to end on the device: signed order → download over real HTTP (with Range and a token)
→ verify → install → events; and every way an order can be wrong leaves the device as it was."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.updater.fetch import FetchConfig, HttpFetcher
from tests.sim.fleet_http import FleetHttpSim
from tests.updater.conftest import Device, make_device
from tests.updater.support import Keys, make_bundle, make_order, snapshot


@pytest.fixture
def sim() -> Iterator[FleetHttpSim]:
    with FleetHttpSim() as s:
        yield s


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Device]:
    d = make_device(tmp_path, fetcher=HttpFetcher(FetchConfig(read_timeout_s=5, stall_window_s=2,
                                                              backoff_initial_s=0.01, backoff_max_s=0.05)))
    yield d
    d.host.close()


class Fleet:
    """The server side of the contract: publishes bundles and signs orders with increasing sequences."""

    def __init__(self, sim: FleetHttpSim, keys: Keys) -> None:
        self.sim, self.keys, self.seq = sim, keys, 0

    def publish(self, data: bytes) -> str:
        return self.sim.add_bundle(hashlib.sha256(data).hexdigest(), data, tokens={"t0k"})

    def order(self, data: bytes, **kw: Any) -> dict[str, Any]:
        self.seq += 1
        kw.setdefault("sequence", self.seq)
        return make_order(self.keys, data, device_id=kw.pop("device_id", "dev-1"), url=self.publish(data),
                          token=kw.pop("token", "t0k"), **kw)


@pytest.fixture
def fleet(sim: FleetHttpSim, dev: Device) -> Fleet:
    return Fleet(sim, dev.keys)


def test_order_deploys_bundle_with_events_in_order(dev: Device, fleet: Fleet) -> None:
    data = make_bundle(dev.keys, version=1)
    outcome = dev.updater.handle_order(fleet.order(data, command_id="cmd-a"))
    assert outcome.status == "healthy", outcome
    assert dev.serving() == 1
    assert dev.kinds() == ["received", "downloading", "verified", "installed", "healthy"]
    assert all(e.command_id == "cmd-a" for e in dev.events)
    assert not any((dev.state / "downloads").iterdir())  # the download is removed once installed


def test_abandoned_partial_downloads_are_cleaned_up(dev: Device, fleet: Fleet) -> None:
    downloads = dev.state / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    (downloads / ("ab" * 32 + ".part")).write_bytes(b"x" * 1000)  # from an order that never completed
    assert dev.updater.handle_order(fleet.order(make_bundle(dev.keys, version=1))).status == "healthy"
    assert list(downloads.iterdir()) == []


def test_resent_command_applied_once(dev: Device, fleet: Fleet, sim: FleetHttpSim) -> None:
    data = make_bundle(dev.keys, version=1)
    order = fleet.order(data, command_id="cmd-once")
    assert dev.updater.handle_order(order).status == "healthy"
    sent = sim.total_body_bytes_sent()
    dev.events.clear()
    again = dev.updater.handle_order(order)
    assert again.status == "already_applied"
    assert dev.kinds() == ["healthy"] and dev.events[0].command_id == "cmd-once"  # the ack, again
    assert sim.total_body_bytes_sent() == sent  # nothing downloaded twice


@pytest.fixture
def at_v2(dev: Device, fleet: Fleet) -> Device:
    assert dev.updater.handle_order(fleet.order(make_bundle(dev.keys, version=2))).status == "healthy"
    dev.events.clear()
    return dev


def _refused(d: Device, order: dict[str, Any], reason: str) -> None:
    before = snapshot(d.state)
    hwm = d.updater.hwm.get("cancer-mlp")
    outcome = d.updater.handle_order(order)
    assert (outcome.status, outcome.reason) == ("rejected", reason), outcome
    assert snapshot(d.state) == before and d.updater.hwm.get("cancer-mlp") == hwm and d.serving() == 2
    assert d.events[-1].kind == "rejected" and d.events[-1].reason == reason


def test_order_for_other_device_rejected(at_v2: Device, fleet: Fleet) -> None:
    _refused(at_v2, fleet.order(make_bundle(at_v2.keys, version=3), device_id="dev-2"), "order")


def test_replayed_old_order_rejected(at_v2: Device, fleet: Fleet) -> None:
    old = fleet.order(make_bundle(at_v2.keys, version=3), command_id="cmd-new-id", sequence=1)
    _refused(at_v2, old, "order")


def test_expired_order_rejected_as_stale(at_v2: Device, fleet: Fleet) -> None:
    order = fleet.order(make_bundle(at_v2.keys, version=3), issued_at=time.time() - 7200, expires_in=3600)
    _refused(at_v2, order, "stale")


def test_order_signed_by_wrong_role_rejected(at_v2: Device, fleet: Fleet) -> None:
    order = fleet.order(make_bundle(at_v2.keys, version=3), signers=at_v2.keys.release)
    _refused(at_v2, order, "signature")


@pytest.mark.parametrize("field", ["version", "model", "digest", "length"])
def test_order_and_bundle_disagree_rejected(at_v2: Device, fleet: Fleet, field: str) -> None:
    data = make_bundle(at_v2.keys, version=3)
    wrong: dict[str, Any] = {"version": {"version": 4}, "model": {"model": "other-model"},
                             "digest": {"digest": "0" * 64}, "length": {"length": len(data) + 1}}[field]
    order = fleet.order(data, **wrong)
    before = snapshot(at_v2.state)
    outcome = at_v2.updater.handle_order(order)
    assert outcome.status in ("rejected", "failed"), outcome
    assert outcome.reason in ("order", "download"), outcome  # a longer declared length fails the download
    assert snapshot(at_v2.state) == before and at_v2.serving() == 2


def test_signed_rollback_order_may_go_back(at_v2: Device, fleet: Fleet) -> None:
    v1 = make_bundle(at_v2.keys, version=1)
    _refused(at_v2, fleet.order(v1), "rollback")
    outcome = at_v2.updater.handle_order(fleet.order(v1, allow_downgrade=True))
    assert outcome.status == "healthy" and at_v2.serving() == 1


def test_cancel_after_the_deployment_finished_is_too_late(at_v2: Device, fleet: Fleet) -> None:
    data = make_bundle(at_v2.keys, version=3)
    assert at_v2.updater.handle_order(fleet.order(data, command_id="cmd-done")).status == "healthy"
    cancel = fleet.order(data, action="cancel", cancels="cmd-done", command_id="cmd-late")
    outcome = at_v2.updater.handle_order(cancel)
    assert (outcome.status, outcome.reason) == ("rejected", "too_late")
    assert at_v2.serving() == 3 and at_v2.events[-1].command_id == "cmd-late"


def test_cancel_during_download(at_v2: Device, fleet: Fleet, sim: FleetHttpSim) -> None:
    data = make_bundle(at_v2.keys, version=3)
    sim.trickle_bytes_per_s = 20_000  # a slow link: the download takes a while
    deploy = fleet.order(data, command_id="cmd-slow")
    cancel = fleet.order(data, action="cancel", cancels="cmd-slow", command_id="cmd-cancel")
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(at_v2.updater.handle_order(deploy)))
    t.start()
    while "downloading" not in at_v2.kinds():
        time.sleep(0.01)
    assert at_v2.updater.handle_order(cancel).status == "cancelled"
    t.join(30)
    assert result[0].status == "cancelled"
    assert at_v2.serving() == 2
    assert {e.kind for e in at_v2.events if e.command_id == "cmd-slow"} >= {"received", "downloading", "cancelled"}
