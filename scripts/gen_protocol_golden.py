"""Write (or check) the golden wire examples in ``tests/golden/protocol/``.

For each example ``<name>`` it writes ``<name>.msgpack`` (the exact frame) and ``<name>.json`` (the
debug form, ``to_json(msg, indent=2)`` plus a newline). The agent's and the server's tests decode these
files, so they must stay stable: regenerate only for a deliberate contract change, and review the diff.

The two ``command_*`` examples carry a realistic deployment-order document (``docs/bundle-format.md``) with
fake keyids and signatures (hex digests of labels, not real Ed25519 signatures: the golden pins the framing,
not the cryptography). They are written uncompressed (``compress=False``; ``encode`` would deflate bodies over
512 bytes) so their bytes can be compared exactly.

``status_v1_1_with_extra`` is built by hand from a raw map (not through ``encode``) to stand in for a
*newer* peer speaking schema 1.1 with fields this build does not know; it follows the documented
canonical rules (sorted keys, shortest ints, float64), so ``encode(decode(frame)) == frame``.

Usage::

    python scripts/gen_protocol_golden.py            # (re)write the files
    python scripts/gen_protocol_golden.py --check    # exit 1 if any file differs from what it would write
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from agent.drift import Edges, NumericHistogram
from agent.protocol import (
    FRAME_MSGPACK,
    FRAME_ZLIB,
    Ack,
    Command,
    DriftWindow,
    Event,
    Heartbeat,
    Message,
    ModelState,
    Status,
    decode,
    encode,
    to_json,
)

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden" / "protocol"

DEVICE = "cam-0042"
T0 = 1767225600.0  # 2026-01-01T00:00:00Z
DEPLOY_ID = "cmd-8c41e0"
CANCEL_ID = "cmd-8c41e1"
UNCOMPRESSED = frozenset({"command_deploy", "command_cancel"})
"""Examples written with ``encode(msg, compress=False)`` (the rest use the default policy)."""


def _fake_hex(label: str, chars: int = 64) -> str:
    """Deterministic hex that looks like a keyid (64 chars), digest or signature (128 chars)."""
    return hashlib.sha512(label.encode()).hexdigest()[:chars]


def _order(signed: dict[str, Any]) -> dict[str, Any]:
    """A deployment-order document signed (in appearance) by two ``orders`` keys."""
    return {"signed": signed,
            "signatures": [{"keyid": _fake_hex(f"orders-key-{i}"), "sig": _fake_hex(f"sig-{i}", 128)}
                           for i in (1, 2)]}


def deploy_order() -> dict[str, Any]:
    digest = _fake_hex("person-detector-5-manifest")
    issued = int(T0) + 60
    return _order({
        "type": "deployment-order", "format": 1, "command_id": DEPLOY_ID, "action": "deploy",
        "device_id": DEVICE, "rollout_id": "ro-2026-01-01-a", "sequence": 17,
        "model": "person-detector", "version": 5, "bundle_digest": digest, "bundle_length": 4_812_288,
        "url": f"https://fleet.example/v1/bundles/{digest}", "token": "tok-3f9c2a7e51d04b8e",
        "token_expires_at": issued + 3600, "issued_at": issued, "expires_at": issued + 86400,
        "allow_downgrade": False,
    })


def cancel_order() -> dict[str, Any]:
    issued = int(T0) + 120
    return _order({
        "type": "deployment-order", "format": 1, "command_id": CANCEL_ID, "action": "cancel",
        "cancels": DEPLOY_ID, "device_id": DEVICE, "rollout_id": "ro-2026-01-01-a", "sequence": 18,
        "issued_at": issued, "expires_at": issued + 86400,
    })


def _histogram(lo: float, hi: float, counts: list[int]) -> dict[str, Any]:
    """A real histogram in the shared drift layout (agent.drift), so the golden windows decode on both sides:
    values at each bin's centre, ``counts[i]`` times, plus one value above the top edge."""
    edges = Edges.uniform(lo, hi, len(counts))
    centres = [(a + b) / 2 for a, b in zip(edges.values[:-1], edges.values[1:], strict=True)]
    values = np.repeat(np.asarray(centres), counts)
    return NumericHistogram.from_values(edges, np.append(values, hi + 1.0)).to_dict()


def examples() -> dict[str, Message]:
    """The golden messages, by file stem (everything except the hand-built newer-minor example)."""
    models = (
        ModelState(name="person-detector", version=4, slot="b", healthy=True),
        ModelState(name="anomaly.tiny", version=0, slot=None, healthy=False),
    )
    wide_features = {
        f"feature_{i:02d}": _histogram(0.0, 1.0, [(i * 7 + j * 13) % 50 for j in range(16)])
        for i in range(12)
    }
    return {
        "heartbeat": Heartbeat(device_id=DEVICE, sent_at=T0 + 30.25, uptime_s=86400.5),
        "status": Status(device_id=DEVICE, state="online", agent_version="0.1.0", models=models,
                         sent_at=T0 + 1.5),
        "status_offline": Status.offline(DEVICE, agent_version="0.1.0"),
        "event": Event(device_id=DEVICE, stream_seq=17, kind="model_activated", at=T0 + 42.0,
                       command_id="cmd-7f3a", model="person-detector", version=4, reason=None,
                       detail={"slot": "b", "load_ms": 412.5, "previous_version": 3}),
        "drift_window": DriftWindow(
            device_id=DEVICE, stream_seq=5, model="person-detector", version=4,
            window_start=T0, window_end=T0 + 300.0, samples=1200, replaces=None,
            features={"brightness": _histogram(0.0, 1.0, [3, 40, 500, 600, 57])},
            slis={"latency_ms_p50": 18.5, "latency_ms_p99": 41.0, "errors": 0},
        ),
        "drift_window_compressed": DriftWindow(
            device_id=DEVICE, stream_seq=9, model="person-detector", version=4,
            window_start=T0, window_end=T0 + 3600.0, samples=14400, replaces=(6, 8),
            features=wide_features, slis={"latency_ms_p50": 18.0, "errors": 2},
        ),
        "ack": Ack(device_id=DEVICE, stream="events", seqs=((0, 16), (18, 20)), missing=((17, 17),)),
        "command_deploy": Command(device_id=DEVICE, command_id=DEPLOY_ID, kind="deploy", order=deploy_order(),
                                  sent_at=T0 + 60.5),
        "command_cancel": Command(device_id=DEVICE, command_id=CANCEL_ID, kind="cancel", order=cancel_order(),
                                  sent_at=T0 + 120.25),
        "event_installed": Event(device_id=DEVICE, stream_seq=21, kind="installed", at=T0 + 95.5,
                                 command_id=DEPLOY_ID, model="person-detector", version=5, reason=None,
                                 detail={"slot": "a", "previous_version": 4,
                                         "bundle_digest": _fake_hex("person-detector-5-manifest")}),
        "event_rolled_back": Event(device_id=DEVICE, stream_seq=22, kind="rolled_back", at=T0 + 400.0,
                                   command_id=None, model="person-detector", version=5, reason="crash_loop",
                                   detail={"message": "model worker exited 5 times within 300 s",
                                           "restarts": 5, "window_s": 300.0, "restored_version": 4, "slot": "b"}),
    }


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def newer_minor_frame() -> bytes:
    """A schema 1.1 status frame from a hypothetical newer agent: one unknown top-level field
    (``battery_pct``) and one unknown per-model field (``accelerator``)."""
    raw = {
        "t": "status",
        "v": [1, 1],
        "device_id": DEVICE,
        "state": "online",
        "agent_version": "0.2.0",
        "models": [{"name": "person-detector", "version": 5, "slot": "a", "healthy": True,
                    "accelerator": "npu"}],
        "sent_at": T0 + 7.0,
        "battery_pct": 87,
    }
    body: bytes = msgpack.packb(_sorted_keys(raw), use_bin_type=True)
    return bytes([FRAME_MSGPACK]) + body


def render() -> dict[str, bytes]:
    """Every golden file name -> its exact content."""
    files: dict[str, bytes] = {}
    frames = {name: encode(msg, compress=False if name in UNCOMPRESSED else None)
              for name, msg in examples().items()}
    frames["status_v1_1_with_extra"] = newer_minor_frame()
    for name, frame in frames.items():
        files[f"{name}.msgpack"] = frame
        files[f"{name}.json"] = (to_json(decode(frame), indent=2) + "\n").encode("utf-8")
    return files


def _same(name: str, old: bytes, new: bytes) -> bool:
    """Equal files; compressed frames compare by their inflated body (deflate output varies by zlib)."""
    if old == new:
        return True
    if name.endswith(".msgpack") and old[:1] == new[:1] == bytes([FRAME_ZLIB]):
        return zlib.decompress(old[1:]) == zlib.decompress(new[1:])
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on drift")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        bad = [
            name
            for name, data in files.items()
            if not (GOLDEN_DIR / name).is_file() or not _same(name, (GOLDEN_DIR / name).read_bytes(), data)
        ]
        for name in bad:
            print(f"golden file out of date: {GOLDEN_DIR / name}", file=sys.stderr)
        return 1 if bad else 0
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (GOLDEN_DIR / name).write_bytes(data)
        print(f"wrote {GOLDEN_DIR / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
