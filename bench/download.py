"""Bundle download: resume after interruptions (bytes fetched again) and throughput against plain urllib.

A 64 MiB bundle is served by the test fleet-server simulator (``tests/sim/fleet_http.py``) over real loopback
sockets, in this process.

- **Resume** (goal, PERFORMANCE.md: after an interruption at most 1 MiB fetched again, also across an agent
  restart). The connection is cut at several points; the figure is the body bytes the server sent in all minus
  the bundle size. The baseline is a downloader that restarts from zero: it fetches again everything it had.
  Two restarts: a fresh ``HttpFetcher`` resuming a partial file left by a failed one, and a child process killed
  with SIGKILL mid-body (bytes in flight in socket buffers are lost and fetched again).
- **Throughput**: ``HttpFetcher.fetch`` against ``urllib.request.urlopen`` + ``shutil.copyfileobj`` into a file
  + fsync (same work: both end with the bytes durable on disk), interleaved A B A B after a warm-up; median of
  the per-repeat ratios with min and max.
- **Bounds**: stall detection time for a 1 byte/s trickle against the configured window, and bytes read past
  the declared length when the server streams endless data.

``python -m bench.download [--quick]``: one JSON object per metric per line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent.updater.fetch import FetchConfig, FetchPermanentError, FetchTransientError, HttpFetcher
from bench.common import emit, ratio_stats
from tests.sim.fleet_http import FleetHttpSim

REPO = Path(__file__).resolve().parents[1]
BENCH = "download"
MIB = 1024 * 1024
TOKEN = "bench-token"
DIGEST = "b" * 64
RESUME_TARGET = "<= 1 MiB (1048576 bytes)"

CHILD = """
import sys
from pathlib import Path
from agent.updater.fetch import FetchConfig, HttpFetcher
HttpFetcher(FetchConfig()).fetch(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
"""


def _no_sleep(_: float) -> None:
    pass


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def _emit_refetch(metric: str, sim: FleetHttpSim, size: int, interrupted_at: int, **extra: object) -> None:
    sim.wait_idle()
    refetched = sim.total_body_bytes_sent() - size
    emit(BENCH, metric, value=refetched, baseline="restart from zero (no Range)", baseline_value=interrupted_at,
         target=RESUME_TARGET, unit="bytes", interrupted_at=interrupted_at, requests=len(sim.records),
         ok=refetched <= MIB, **extra)


def bench_resume(sim: FleetHttpSim, url: str, size: int, digest: str, work: Path, *, points: list[int]) -> None:
    dest = work / "resume.part"
    for point in points:
        _fresh(dest)
        sim.clear_records()
        sim.drop_after_bytes = point
        fetcher = HttpFetcher(FetchConfig(), sleep=_no_sleep)
        fetcher.fetch(url, TOKEN, dest, size)
        assert _sha(dest) == digest
        _emit_refetch(f"refetched_bytes_cut_at_{point}", sim, size, point,
                      client_refetched=fetcher.bytes_downloaded - size)

    # Restart: a failed fetcher leaves the partial file; a new one (a new agent process) resumes it.
    point = size // 2 + 4321
    _fresh(dest)
    sim.clear_records()
    sim.drop_after_bytes = point
    try:
        HttpFetcher(FetchConfig(max_attempts=1), sleep=_no_sleep).fetch(url, TOKEN, dest, size)
        raise AssertionError("the cut did not happen")
    except FetchTransientError:
        pass
    HttpFetcher(FetchConfig(), sleep=_no_sleep).fetch(url, TOKEN, dest, size)
    assert _sha(dest) == digest
    _emit_refetch("refetched_bytes_restart_fresh_fetcher", sim, size, point)

    # Restart after SIGKILL: a child process downloads (paced so it is mid-body), dies, this process resumes.
    _fresh(dest)
    sim.clear_records()
    sim.trickle_bytes_per_s = 128 * MIB
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, TOKEN, str(dest), str(size)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 20
        while (not dest.exists() or dest.stat().st_size < size // 3) and time.monotonic() < deadline:
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(10)
    sim.trickle_bytes_per_s = None
    sim.wait_idle()
    have = dest.stat().st_size
    sent_before_kill = sim.total_body_bytes_sent()
    HttpFetcher(FetchConfig(), sleep=_no_sleep).fetch(url, TOKEN, dest, size)
    assert _sha(dest) == digest
    _emit_refetch("refetched_bytes_restart_after_kill9", sim, size, have,
                  server_sent_before_kill=sent_before_kill)


def _serve_in_child(data_file: Path) -> tuple[subprocess.Popen[str], str]:
    """The simulator in its own process: the client measured here does not share a GIL with the server."""
    child = subprocess.Popen([sys.executable, "-m", "tests.sim.fleet_http", "--file", str(data_file), "--digest",
                              DIGEST, "--token", TOKEN], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def bench_throughput(url: str, size: int, digest: str, out_dir: Path, repeats: int, *, where: str,
                     configs: dict[str, FetchConfig]) -> None:
    """Each candidate config and the urllib baseline, interleaved (C1 C2 … B, C1 C2 … B, …)."""
    base_path = out_dir / "bench-download-base.bin"
    paths = {name: out_dir / f"bench-download-{name}.part" for name in configs}

    def candidate(name: str) -> float:
        _fresh(paths[name])
        t0 = time.perf_counter()
        HttpFetcher(configs[name]).fetch(url, TOKEN, paths[name], size)
        return time.perf_counter() - t0

    def baseline() -> float:
        _fresh(base_path)
        t0 = time.perf_counter()
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as resp, base_path.open("wb") as f:
            shutil.copyfileobj(resp, f, 64 * 1024)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0

    cand_s: dict[str, list[float]] = {name: [] for name in configs}
    base_s: list[float] = []
    try:
        for name in configs:  # warm-up (page cache, allocator)
            candidate(name)
        baseline()
        for _ in range(repeats):
            for name in configs:
                cand_s[name].append(candidate(name))
            base_s.append(baseline())
        assert all(_sha(p) == digest for p in paths.values()) and _sha(base_path) == digest
    finally:
        for p in [*paths.values(), base_path]:
            _fresh(p)
    base_mbps = [size / s / 1e6 for s in base_s]
    for name, secs in cand_s.items():
        cand_mbps = [size / s / 1e6 for s in secs]
        med, lo, hi = ratio_stats(cand_mbps, base_mbps)
        metric = "_".join(["throughput_MBps", *([where] if where != "disk" else []), *([name] if name else [])])
        emit(BENCH, metric, value=statistics.median(cand_mbps),
             baseline="urllib.request urlopen + copyfileobj(64 KiB) + fsync",
             baseline_value=statistics.median(base_mbps),
             target=">= 0.9x urllib.request (proposed; PERFORMANCE.md sets none)",
             ratio_median=round(med, 3), ratio_min=round(lo, 3), ratio_max=round(hi, 3), repeats=repeats,
             size_bytes=size, destination=where, chunk_size=configs[name].chunk_size,
             server="simulator in a child process")


def bench_bounds(sim: FleetHttpSim, work: Path) -> None:
    data = os.urandom(MIB)
    url = sim.add_bundle("c" * 64, data, {TOKEN})

    window = 0.5
    sim.trickle_bytes_per_s = 1
    cfg = FetchConfig(stall_window_s=window, max_attempts=1)
    t0 = time.monotonic()
    try:
        HttpFetcher(cfg).fetch(url, TOKEN, _fresh(work / "stall.part"), len(data))
        raise AssertionError("a 1 byte/s trickle was not detected")
    except FetchTransientError as exc:
        assert exc.reason == "stalled", exc
    elapsed = time.monotonic() - t0
    sim.trickle_bytes_per_s = None
    emit(BENCH, "stall_detect_s", value=elapsed, baseline="configured stall_window_s", baseline_value=window,
         target="<= stall_window_s + 0.1 s", trickle_bytes_per_s=1)

    sim.endless = True
    fetcher = HttpFetcher(FetchConfig(), sleep=_no_sleep)
    dest = _fresh(work / "endless.part")
    try:
        fetcher.fetch(url, TOKEN, dest, len(data))
        raise AssertionError("endless data was accepted")
    except FetchPermanentError as exc:
        assert exc.reason == "too_long" and not dest.exists(), exc
    sim.endless = False
    emit(BENCH, "endless_bytes_read_past_cap", value=fetcher.bytes_downloaded - len(data),
         baseline="one chunk (chunk_size)", baseline_value=FetchConfig().chunk_size, target="<= chunk_size",
         unit="bytes", served_up_to=sim.endless_limit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7 repeats, 4 cut points (well under a minute)")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (7 if args.quick else 15)
    size = args.size_mib * MIB
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    points = [MIB, 16 * MIB + 12345, 40 * MIB + 777, size - MIB // 2]
    if not args.quick:
        points += [1, 64 * 1024, 8 * MIB, 32 * MIB, size - 1]
    points = sorted(p for p in set(points) if 0 < p < size)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp, FleetHttpSim() as sim:
        work = Path(tmp)
        url = sim.add_bundle(DIGEST, data, {TOKEN})
        bench_resume(sim, url, size, digest, work, points=points)
        bench_bounds(sim, work)
        data_file = work / "bundle.bin"
        data_file.write_bytes(data)
        del data
        child, child_url = _serve_in_child(data_file)
        try:
            # The default config, and a larger chunk (fewer, larger reads and writes) for comparison.
            configs = {"": FetchConfig(), "chunk256k": FetchConfig(chunk_size=256 * 1024)}
            bench_throughput(child_url, size, digest, work, repeats, where="disk", configs=configs)
            shm = Path("/dev/shm")  # no disk: the downloader's own cost against urllib's
            if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * size:
                bench_throughput(child_url, size, digest, shm, repeats, where="tmpfs", configs={"": FetchConfig()})
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
