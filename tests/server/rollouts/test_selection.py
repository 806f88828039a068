"""Deterministic device selection: the same devices in the same order on every replica, and a device's rank never
changes when others join (hawkBit #1548)."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.rollouts import Phase, cumulative_sizes, rank_devices, rank_key, select_devices
from fleet_server.rollouts import selection as selection_module
from tests.server.rollouts.support import ids, make_spec

DEVICE_IDS = st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True), unique=True, max_size=60)


def naive(rollout_id: str, devices: list[str]) -> list[str]:
    """The obvious implementation: Python sort by the sha256 hex of each device."""
    return sorted(devices, key=lambda d: (hashlib.sha256(f"{rollout_id}\n{d}".encode()).hexdigest(), d))


def test_selection_matches_the_naive_sha256_sort() -> None:
    devices = ids(5000)
    assert rank_devices("ro-a", devices) == naive("ro-a", devices)
    assert select_devices("ro-a", devices, 50) == naive("ro-a", devices)[:50]


@given(DEVICE_IDS, st.randoms(use_true_random=False))
def test_selection_does_not_depend_on_input_order(devices: list[str], rng: random.Random) -> None:
    shuffled = devices[:]
    rng.shuffle(shuffled)
    assert rank_devices("ro-a", shuffled) == rank_devices("ro-a", devices) == naive("ro-a", devices)


@given(DEVICE_IDS, DEVICE_IDS)
def test_late_joiners_never_reorder_existing_devices(first: list[str], joiners: list[str]) -> None:
    before = rank_devices("ro-a", first)
    after = rank_devices("ro-a", first + [d for d in joiners if d not in first])
    assert [d for d in after if d in set(first)] == before


@given(DEVICE_IDS, st.integers(0, 100))
def test_select_devices_takes_a_prefix_of_the_ranking(devices: list[str], count: int) -> None:
    chosen = select_devices("ro-a", devices, count)
    assert chosen == rank_devices("ro-a", devices)[:count]
    assert len(chosen) == min(count, len(devices))


@pytest.mark.parametrize("count", [-1, True, 1.5])
def test_select_devices_refuses_a_bad_count(count: object) -> None:
    with pytest.raises(ValueError, match="count"):
        select_devices("ro-a", ids(3), count)  # type: ignore[arg-type]


def test_each_rollout_picks_its_own_canaries() -> None:
    devices = ids(1000)
    assert set(select_devices("ro-a", devices, 10)) != set(select_devices("ro-b", devices, 10))


def test_rank_key_is_sha256_of_rollout_and_device() -> None:
    assert rank_key("ro-a", "dev-1") == hashlib.sha256(b"ro-a\ndev-1").digest()


def test_64_bit_ties_fall_back_to_a_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two digests equal in their first 64 bits (about 2**-64 per pair) must still sort by full digest, then id."""
    real = selection_module._digests

    def colliding(rollout_id: str, device_ids: list[str]) -> list[bytes]:
        return [b"\x00" * 8 + d[8:] for d in real(rollout_id, device_ids)]

    monkeypatch.setattr(selection_module, "_digests", colliding)
    devices = ids(50)
    expected = sorted(devices, key=lambda d: (b"\x00" * 8 + rank_key("ro-a", d)[8:], d))
    assert rank_devices("ro-a", devices) == expected
    assert rank_devices("ro-a", list(reversed(devices))) == expected


def test_percent_phases_round_up_without_float_noise() -> None:
    spec = make_spec(200, phases=[Phase(percent=10), Phase(percent=12.5), Phase(percent=33.3), Phase(percent=100)])
    assert spec.sizes == (20, 25, 67, 200)


def test_phase_membership_is_cumulative_and_never_shrinks() -> None:
    spec = make_spec(100, phases=[Phase(count=10), Phase(percent=5), Phase(percent=50), Phase(count=500)])
    assert spec.sizes == (10, 10, 50, 100)
    assert cumulative_sizes([3, 1, 7, 7, 2]) == [3, 3, 7, 7, 7]
    for n in range(len(spec.phases) - 1):
        assert set(spec.members(n)) <= set(spec.members(n + 1))


def test_late_joiner_falls_into_the_phase_its_rank_says() -> None:
    base = ids(100)
    old_phase_1 = make_spec(target=base, phases=[Phase(count=10), Phase(percent=100)]).members(0)
    joiner = next(d for d in (f"late-{i}" for i in range(10_000)) if rank_devices("ro-test", [*base, d]).index(d) < 10)
    grown = make_spec(target=[*base, joiner], phases=[Phase(count=10), Phase(percent=100)])
    assert joiner in grown.members(0)
    # the devices already in phase 1 keep their relative order; the last of them moved back into phase 2
    assert [d for d in grown.members(0) if d != joiner] == list(old_phase_1[:9])
    assert old_phase_1[9] in grown.members(1)
