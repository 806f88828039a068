"""The bundle downloader against a real HTTP simulator over real sockets (THREATS.md: "Slow retrieval",
"Endless data"). Each test is named after the fault it shows handled; windows and timeouts are shrunk so every
test runs in real time in well under 5 s."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.updater.fetch import FetchConfig, FetchError, FetchPermanentError, FetchTransientError, HttpFetcher
from tests.sim.fleet_http import FleetHttpSim

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
DATA = random.Random(7).randbytes(MIB)
DIGEST = "ab" * 32
TOKEN = "tok-device-1"
CHUNK = 64 * 1024


def fast_config(**over: Any) -> FetchConfig:
    base: dict[str, Any] = {"connect_timeout_s": 2.0, "read_timeout_s": 2.0, "stall_window_s": 0.5,
                            "min_bytes_per_window": 1024, "chunk_size": CHUNK, "max_attempts": 8,
                            "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    return FetchConfig(**(base | over))


class Sleeps:
    """An injected ``sleep``: records the delays (and when), optionally runs a hook (the server recovers)."""

    def __init__(self, hook: Any = None) -> None:
        self.delays: list[float] = []
        self.at: list[float] = []
        self.hook = hook

    def __call__(self, s: float) -> None:
        self.delays.append(s)
        self.at.append(time.monotonic())
        if self.hook is not None:
            self.hook(len(self.delays))


@pytest.fixture
def sim() -> Iterator[FleetHttpSim]:
    before = set(threading.enumerate())
    s = FleetHttpSim().start()
    try:
        yield s
    finally:
        t0 = time.monotonic()
        s.stop()
        assert time.monotonic() - t0 < 2.0, "stop() must not wait for a trickling or silent response"
        leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
        assert not leaked, f"simulator threads leaked: {leaked}"


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    d = tmp_path / "downloads"
    d.mkdir()
    return d


def fetch(fetcher: HttpFetcher, url: str, dest: Path, length: int = len(DATA), token: str = TOKEN) -> Path:
    return fetcher.fetch(url, token, dest, length)


def assert_single_complete_file(downloads: Path, dest: Path, data: bytes = DATA) -> None:
    assert sorted(p.name for p in downloads.iterdir()) == [dest.name], "exactly one file, no temp leftovers"
    assert dest.read_bytes() == data


# -- Slow retrieval ---------------------------------------------------------------------------------------------


def test_slow_retrieval_1_byte_per_s_trickle_is_stalled_within_window_then_resumed_with_range(
        sim: FleetHttpSim, downloads: Path) -> None:
    data = DATA[:200_000]
    url = sim.add_bundle(DIGEST, data, {TOKEN})
    sim.trickle_bytes_per_s = 1

    def recover(_: int) -> None:
        sim.trickle_bytes_per_s = None

    sleeps = Sleeps(recover)
    fetcher = HttpFetcher(fast_config(stall_window_s=0.5, read_timeout_s=2.0), sleep=sleeps)
    dest = downloads / f"{DIGEST}.part"
    t0 = time.monotonic()
    fetcher.fetch(url, TOKEN, dest, len(data))
    sim.wait_idle()

    assert [e.reason for e in fetcher.last_errors] == ["stalled"]
    detected_after = sleeps.at[0] - t0
    assert 0.45 <= detected_after <= 0.5 + 0.4, f"stall detected after {detected_after:.2f}s, window 0.5s"
    first, second = sim.records
    assert first.range_header is None and second.range_start is not None and second.range_start >= 1
    assert second.status == 206
    assert fetcher.bytes_downloaded == len(data), "no byte received twice"
    assert_single_complete_file(downloads, dest, data)


def test_slow_retrieval_trickle_forever_gives_up_transient_after_max_attempts_and_keeps_partial(
        sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.trickle_bytes_per_s = 200  # 4-byte writes every 20 ms: 100 bytes per 0.5 s window < 1024
    fetcher = HttpFetcher(fast_config(stall_window_s=0.5, max_attempts=2), sleep=Sleeps())
    dest = downloads / "b.part"
    t0 = time.monotonic()
    with pytest.raises(FetchTransientError) as ei:
        fetch(fetcher, url, dest)
    assert ei.value.reason == "stalled"
    assert time.monotonic() - t0 < 2 * 0.5 + 0.8
    assert 0 < dest.stat().st_size < len(DATA), "the trickled bytes are kept for a later resume"


def test_dropped_mid_body_is_resumed_with_range(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.drop_after_bytes = 300_000
    fetcher = HttpFetcher(fast_config(), sleep=Sleeps())
    dest = downloads / "b.part"
    fetch(fetcher, url, dest)
    sim.wait_idle()
    first, second = sim.records
    assert (first.outcome, first.bytes_sent) == ("dropped", 300_000)
    assert (second.range_header, second.status, second.bytes_sent) == ("bytes=300000-", 206, len(DATA) - 300_000)
    assert [e.reason for e in fetcher.last_errors] == ["short_body"]
    assert fetcher.attempts == 2 and fetcher.bytes_downloaded == len(DATA)
    assert_single_complete_file(downloads, dest)


def test_flapping_5_times_completes_without_restarting_from_zero(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.flap, sim.flap_after_bytes = 5, 100_000
    sleeps = Sleeps()
    fetcher = HttpFetcher(fast_config(max_attempts=8), sleep=sleeps)
    dest = downloads / "b.part"
    fetch(fetcher, url, dest)
    sim.wait_idle()

    assert len(sim.records) == 6 and [r.outcome for r in sim.records] == ["dropped"] * 5 + ["complete"]
    offset = 0
    for rec in sim.records:  # each retry asks for exactly the first byte it does not have
        assert rec.range_start == (offset or None)
        offset += rec.bytes_sent
    dropped = sum(r.bytes_sent for r in sim.records if r.outcome == "dropped")
    refetched = sim.total_body_bytes_sent() - len(DATA)
    assert refetched <= dropped
    assert refetched == 0 and fetcher.bytes_downloaded == len(DATA)
    # Every attempt made progress, so the backoff never grew past its first step.
    assert len(sleeps.delays) == 5 and max(sleeps.delays) <= 0.01
    assert_single_complete_file(downloads, dest)


def test_resume_across_agent_restart_refetches_at_most_1_mib(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    dest = downloads / "b.part"
    sim.drop_after_bytes = 400_000
    with pytest.raises(FetchTransientError) as ei:
        fetch(HttpFetcher(fast_config(max_attempts=1)), url, dest)
    assert ei.value.reason == "short_body" and dest.stat().st_size == 400_000

    restarted = HttpFetcher(fast_config())  # a new process: nothing but the partial file survives
    fetch(restarted, url, dest)
    sim.wait_idle()
    assert sim.records[-1].range_header == "bytes=400000-"
    refetched = sim.total_body_bytes_sent() - len(DATA)
    assert refetched <= MIB and restarted.bytes_downloaded == len(DATA) - 400_000
    assert_single_complete_file(downloads, dest)


def test_resume_after_kill_9_mid_download_refetches_at_most_1_mib(sim: FleetHttpSim, downloads: Path) -> None:
    data = random.Random(9).randbytes(2 * MIB)
    url = sim.add_bundle(DIGEST, data, {TOKEN})
    dest = downloads / "b.part"
    sim.trickle_bytes_per_s = 2 * MIB  # ~42 KiB every 20 ms: the child is mid-body when it is killed
    code = ("import sys; from pathlib import Path; from agent.updater.fetch import FetchConfig, HttpFetcher; "
            "HttpFetcher(FetchConfig()).fetch(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))")
    child = subprocess.Popen([sys.executable, "-c", code, url, TOKEN, str(dest), str(len(data))], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 4
        while (not dest.exists() or dest.stat().st_size < 512 * 1024) and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(5)
    have = dest.stat().st_size
    assert 0 < have < len(data), "killed mid-body"
    sim.trickle_bytes_per_s = None
    sim.wait_idle()

    fetch(HttpFetcher(fast_config()), url, dest, len(data))
    sim.wait_idle()
    assert sim.records[-1].range_start == have
    refetched = sim.total_body_bytes_sent() - len(data)  # bytes in flight when the process died, sent again
    assert 0 <= refetched <= MIB
    assert_single_complete_file(downloads, dest, data)


def test_server_ignoring_range_still_yields_the_correct_file(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.drop_after_bytes = 300_000

    def ignore_range(_: int) -> None:
        sim.ignore_range = True

    fetcher = HttpFetcher(fast_config(), sleep=Sleeps(ignore_range))
    dest = downloads / "b.part"
    fetch(fetcher, url, dest)
    sim.wait_idle()
    second = sim.records[1]
    assert second.range_header == "bytes=300000-" and second.status == 200 and second.bytes_sent == len(DATA)
    assert_single_complete_file(downloads, dest)


def test_server_ignoring_range_overwrites_a_corrupt_partial(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.ignore_range = True
    dest = downloads / "b.part"
    dest.write_bytes(b"\xff" * 500_000)
    fetch(HttpFetcher(fast_config()), url, dest)
    assert_single_complete_file(downloads, dest)


# -- Endless data -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("announced", ["match", "none"])
@pytest.mark.parametrize("resuming", [False, True])
def test_endless_data_one_byte_longer_than_declared_is_too_long_and_partial_removed(
        sim: FleetHttpSim, downloads: Path, announced: str, resuming: bool) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.extra_bytes, sim.extra_length = 1, announced
    dest = downloads / "b.part"
    if resuming:
        dest.write_bytes(DATA[:100_000])
    fetcher = HttpFetcher(fast_config(), sleep=Sleeps())
    with pytest.raises(FetchPermanentError) as ei:
        fetch(fetcher, url, dest)
    assert ei.value.reason == "too_long"
    assert fetcher.attempts == 1, "permanent: not retried"
    assert fetcher.bytes_downloaded <= len(DATA) + CHUNK
    if announced == "match":
        assert fetcher.bytes_downloaded == 0, "refused on the announced length, before reading the body"
    assert not dest.exists() and list(downloads.iterdir()) == []


@pytest.mark.parametrize("resuming", [False, True])
def test_endless_data_1_gib_stream_aborts_after_cap_plus_one_chunk(
        sim: FleetHttpSim, downloads: Path, resuming: bool) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.endless, sim.endless_limit = True, 1 << 30  # the body, then 1 GiB of zeros, no Content-Length
    dest = downloads / "b.part"
    if resuming:
        dest.write_bytes(DATA[:100_000])
    fetcher = HttpFetcher(fast_config(), sleep=Sleeps())
    t0 = time.monotonic()
    with pytest.raises(FetchPermanentError) as ei:
        fetch(fetcher, url, dest)
    assert ei.value.reason == "too_long"
    assert time.monotonic() - t0 < 2
    have_before = 100_000 if resuming else 0
    assert fetcher.bytes_downloaded <= len(DATA) - have_before + CHUNK
    assert not dest.exists() and list(downloads.iterdir()) == []


def test_bytes_after_a_lying_content_length_are_never_read_into_the_file(
        sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.extra_bytes, sim.extra_length = 4096, "lie"  # announces the right length, then sends more on the wire
    dest = downloads / "b.part"
    fetcher = HttpFetcher(fast_config())
    fetch(fetcher, url, dest)
    assert fetcher.bytes_downloaded == len(DATA)
    assert_single_complete_file(downloads, dest)


def test_shorter_than_declared_is_transient_then_succeeds_when_server_fixed(
        sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA[:-1000], {TOKEN})
    dest = downloads / "b.part"
    with pytest.raises(FetchTransientError) as ei:
        fetch(HttpFetcher(fast_config(max_attempts=2), sleep=Sleeps()), url, dest)
    assert ei.value.reason in ("short_body", "range_not_satisfiable")
    assert dest.stat().st_size == len(DATA) - 1000, "the partial file is kept for resume"

    sim.add_bundle(DIGEST, DATA, {TOKEN})  # the server is fixed
    sim.wait_idle()
    sim.clear_records()
    fetcher = HttpFetcher(fast_config())
    fetch(fetcher, url, dest)
    sim.wait_idle()
    [rec] = sim.records
    assert rec.range_start == len(DATA) - 1000 and rec.bytes_sent == 1000
    assert_single_complete_file(downloads, dest)


def test_shorter_than_declared_within_one_fetch_retries_until_the_server_is_fixed(
        sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA[:-1000], {TOKEN})

    def fix(_: int) -> None:
        sim.add_bundle(DIGEST, DATA, {TOKEN})

    fetcher = HttpFetcher(fast_config(), sleep=Sleeps(fix))
    dest = downloads / "b.part"
    fetch(fetcher, url, dest)
    assert [e.reason for e in fetcher.last_errors] == ["short_body"]
    assert_single_complete_file(downloads, dest)


# -- Permanent refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "token", "digest"), [
    (401, "", DIGEST), (403, "someone-elses-token", DIGEST), (404, TOKEN, "cd" * 32), (410, TOKEN, DIGEST)])
def test_http_401_403_404_410_are_permanent_and_not_retried(
        sim: FleetHttpSim, downloads: Path, status: int, token: str, digest: str) -> None:
    sim.add_bundle(DIGEST, DATA, {TOKEN})
    if status == 410:
        sim.withdraw(DIGEST)
    fetcher = HttpFetcher(fast_config(), sleep=Sleeps())
    dest = downloads / "b.part"
    with pytest.raises(FetchPermanentError) as ei:
        fetcher.fetch(sim.url(digest), token, dest, len(DATA))
    assert (ei.value.reason, ei.value.status) == (f"http_{status}", status)
    assert fetcher.attempts == 1 and not dest.exists()


def test_no_space_is_permanent_and_nothing_written(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    asked: list[Path] = []
    margin = 16 * MIB

    def disk_free(path: Path) -> int:
        asked.append(path)
        return len(DATA) + margin - 1

    dest = downloads / "b.part"
    fetcher = HttpFetcher(fast_config(free_space_margin_bytes=margin), disk_free=disk_free)
    with pytest.raises(FetchPermanentError) as ei:
        fetch(fetcher, url, dest)
    assert ei.value.reason == "no_space"
    assert asked == [downloads] and sim.records == [] and list(downloads.iterdir()) == []
    # Exactly enough room (the margin included) is enough.
    fetch(HttpFetcher(fast_config(free_space_margin_bytes=margin), disk_free=lambda p: len(DATA) + margin),
          url, dest)
    assert_single_complete_file(downloads, dest)


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://127.0.0.1/v1/bundles/x", "bad_scheme"), ("file:///etc/passwd", "bad_scheme"),
    ("gopher://127.0.0.1:70/x", "bad_scheme"), ("//127.0.0.1/x", "bad_scheme"),
    ("http:///no-host", "bad_url"), ("http://127.0.0.1:99999/x", "bad_url"), ("http://[::1/x", "bad_url"),
    ("http://user:pw@127.0.0.1/x", "bad_url")])
def test_unknown_scheme_or_malformed_url_is_permanent(downloads: Path, url: str, reason: str) -> None:
    fetcher = HttpFetcher(fast_config())
    with pytest.raises(FetchPermanentError) as ei:
        fetcher.fetch(url, TOKEN, downloads / "b.part", 10)
    assert ei.value.reason == reason
    assert fetcher.attempts == 0 and list(downloads.iterdir()) == []


def test_token_with_header_injection_is_refused_permanently(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    with pytest.raises(FetchPermanentError) as ei:
        HttpFetcher(fast_config()).fetch(url, "tok\r\nX-Evil: 1", downloads / "b.part", len(DATA))
    assert ei.value.reason == "bad_request"


# -- Silent, refused, reset, 5xx --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["after_headers", "before_headers"])
def test_silent_server_hits_read_timeout_and_is_transient(sim: FleetHttpSim, downloads: Path, where: str) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    if where == "after_headers":
        sim.silent = True
    else:
        sim.silent_before_headers = True
    fetcher = HttpFetcher(fast_config(read_timeout_s=0.3, stall_window_s=10, max_attempts=2), sleep=Sleeps())
    t0 = time.monotonic()
    with pytest.raises(FetchTransientError) as ei:
        fetch(fetcher, url, downloads / "b.part")
    elapsed = time.monotonic() - t0
    assert ei.value.reason == "timeout" and isinstance(ei.value.__cause__, TimeoutError)
    assert fetcher.attempts == 2 and 0.55 <= elapsed < 1.5


def test_connection_refused_is_transient(downloads: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    fetcher = HttpFetcher(fast_config(max_attempts=3), sleep=sleeps)
    with pytest.raises(FetchTransientError) as ei:
        fetcher.fetch(f"http://127.0.0.1:{port}/v1/bundles/x", TOKEN, downloads / "b.part", 10)
    assert ei.value.reason == "refused" and fetcher.attempts == 3 and len(sleeps.delays) == 2
    assert [e.reason for e in fetcher.last_errors] == ["refused"] * 3


def test_connection_reset_and_503_are_retried_then_succeed(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.fail_next_requests, sim.fail_mode = 1, "reset"

    def then_503(n: int) -> None:
        if n == 1:
            sim.fail_next_requests, sim.fail_mode = 2, "503"

    fetcher = HttpFetcher(fast_config(), sleep=Sleeps(then_503))
    dest = downloads / "b.part"
    fetch(fetcher, url, dest)
    assert [e.reason for e in fetcher.last_errors] == ["reset", "http_503", "http_503"]
    assert fetcher.attempts == 4
    assert_single_complete_file(downloads, dest)


def test_backoff_is_capped_exponential_with_jitter(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    for jitter, expected in [(1.0, [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]),
                             (0.0, [0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])]:
        sim.fail_next_requests = 7
        sleeps = Sleeps()
        fetcher = HttpFetcher(fast_config(max_attempts=8, backoff_initial_s=0.5, backoff_max_s=2.0), sleep=sleeps,
                              jitter=lambda j=jitter: j)
        dest = downloads / f"b{jitter}.part"
        fetch(fetcher, url, dest)
        assert sleeps.delays == expected and fetcher.attempts == 8


def test_retries_exhausted_raise_the_last_transient_error(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.fail_next_requests = 100
    sleeps = Sleeps()
    fetcher = HttpFetcher(fast_config(max_attempts=3), sleep=sleeps)
    with pytest.raises(FetchTransientError) as ei:
        fetch(fetcher, url, downloads / "b.part")
    assert (ei.value.reason, ei.value.status) == ("http_503", 503)
    assert fetcher.attempts == 3 and len(sleeps.delays) == 2


def test_retry_after_is_honoured_up_to_backoff_max(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.fail_next_requests, sim.fail_mode, sim.retry_after_s = 2, "429", 3
    sleeps = Sleeps()
    fetch(HttpFetcher(fast_config(backoff_initial_s=0.1, backoff_max_s=5.0), sleep=sleeps), url,
          downloads / "a.part")
    assert sleeps.delays == [3.0, 3.0]
    sim.fail_next_requests, sim.retry_after_s = 1, 3600
    sleeps = Sleeps()
    fetch(HttpFetcher(fast_config(backoff_initial_s=0.1, backoff_max_s=5.0), sleep=sleeps), url,
          downloads / "b.part")
    assert sleeps.delays == [5.0], "a server cannot park the device for an hour"


# -- Partial-file states and progress ---------------------------------------------------------------------------


def test_partial_already_complete_returns_without_a_request(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    dest = downloads / "b.part"
    dest.write_bytes(DATA)
    progress: list[tuple[int, int]] = []
    fetcher = HttpFetcher(fast_config())
    assert fetcher.fetch(url, TOKEN, dest, len(DATA), on_progress=lambda a, b: progress.append((a, b))) == dest
    assert sim.records == [] and fetcher.attempts == 0 and progress == [(len(DATA), len(DATA))]


def test_partial_longer_than_expected_is_deleted_and_fetched_from_zero(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    dest = downloads / "b.part"
    dest.write_bytes(DATA + b"junk")
    fetch(HttpFetcher(fast_config()), url, dest)
    sim.wait_idle()
    assert [r.range_header for r in sim.records] == [None]
    assert_single_complete_file(downloads, dest)


def test_zero_length_bundle_needs_no_request(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, b"", {TOKEN})
    dest = downloads / "b.part"
    HttpFetcher(fast_config()).fetch(url, TOKEN, dest, 0)
    assert dest.read_bytes() == b"" and sim.records == []


def test_progress_is_reported_monotonically_up_to_the_expected_length(sim: FleetHttpSim, downloads: Path) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.drop_after_bytes = 300_000
    progress: list[tuple[int, int]] = []
    HttpFetcher(fast_config(), sleep=Sleeps()).fetch(url, TOKEN, downloads / "b.part", len(DATA),
                                                     on_progress=lambda a, b: progress.append((a, b)))
    haves = [a for a, _ in progress]
    assert haves == sorted(haves) and progress[-1] == (len(DATA), len(DATA))
    assert {b for _, b in progress} == {len(DATA)} and 300_000 in haves


def test_enospc_while_writing_is_permanent_no_space(sim: FleetHttpSim, downloads: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    fetcher = HttpFetcher(fast_config(), sleep=Sleeps())
    with pytest.raises(FetchPermanentError) as ei:
        fetch(fetcher, url, downloads / "b.part")
    assert ei.value.reason == "no_space" and fetcher.attempts == 1


def test_eio_on_fsync_is_transient_and_the_retry_resumes(sim: FleetHttpSim, downloads: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    real_fsync = os.fsync
    failures = [OSError(errno.EIO, "Input/output error")]

    def flaky(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    fetcher = HttpFetcher(fast_config(), sleep=Sleeps())
    dest = downloads / "b.part"
    fetch(fetcher, url, dest)
    assert [e.reason for e in fetcher.last_errors] == ["io_error"]
    assert fetcher.bytes_downloaded == len(DATA), "the retry found the file complete: no byte fetched again"
    assert_single_complete_file(downloads, dest)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="stall_window_s"):
        FetchConfig(stall_window_s=0)
    with pytest.raises(ValueError, match="max_attempts"):
        FetchConfig(max_attempts=0)


# -- The simulator itself ---------------------------------------------------------------------------------------


def test_simulator_stops_promptly_mid_trickle_without_leaking_threads() -> None:
    before = set(threading.enumerate())
    sim = FleetHttpSim().start()
    url = sim.add_bundle(DIGEST, DATA, {TOKEN})
    sim.trickle_bytes_per_s = 1
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    conn.request("GET", url.split(str(sim.port), 1)[1], headers={"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read1(10) == DATA[:1]
    t0 = time.monotonic()
    sim.stop()
    assert time.monotonic() - t0 < 1.0
    conn.close()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert sim.records[0].outcome == "stopped"


# -- HTTPS ------------------------------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-sim")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_pinned_ca_resumes_and_an_untrusted_certificate_is_refused(tmp_path: Path,
                                                                               downloads: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with FleetHttpSim(ssl_context=ctx) as sim:
        url = sim.add_bundle(DIGEST, DATA, {TOKEN})
        assert url.startswith("https://")
        sim.drop_after_bytes = 200_000
        dest = downloads / "b.part"
        fetch(HttpFetcher(fast_config(ca_file=str(cert)), sleep=Sleeps()), url, dest)
        assert_single_complete_file(downloads, dest)
        sim.wait_idle()
        assert sim.records[1].range_start == 200_000

        with pytest.raises(FetchTransientError) as ei:  # the system trust store does not know this server
            fetch(HttpFetcher(fast_config(max_attempts=1)), url, downloads / "c.part")
        assert ei.value.reason == "tls_verify"
        assert not (downloads / "c.part").exists()


def test_every_failure_is_a_fetch_error_subclass() -> None:
    assert issubclass(FetchTransientError, FetchError) and issubclass(FetchPermanentError, FetchError)
    e = FetchTransientError("stalled", "x")
    assert e.reason == "stalled" and str(e) == "stalled: x"
