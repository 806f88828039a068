"""Test helpers for agent.bundle: keys, trust roots, real small bundles, hand-built tar headers, counting streams.

Everything valid is built with the same public API the release tool and the fleet server use; everything hostile is
built by hand (tar headers with correct checksums, so a rejection proves the rule, not a checksum accident).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.bundle import (
    MANIFEST_PREFIX,
    ORDER_PREFIX,
    ROOT_PREFIX,
    BundleError,
    PublicKey,
    SigningKey,
    TrustRoot,
    VerifiedBundle,
    build_manifest,
    canonical_json,
    make_order_signed,
    make_root_signed,
    sign_document,
    verify_bundle,
    write_bundle,
)
from agent.demo import MODELS_DIR
from agent.drift import Edges, NumericHistogram, Summary
from agent.profiles import FirmwareProfile, builtin_profiles_dir, resolve_profile

NOW = 1_800_000_000.0
"""The trusted time of every test (2027-01-15)."""
YEAR = 365 * 24 * 3600
DEVICE = "pi-kitchen-01"
FAKE_MODEL = b"\x08\x07fake-onnx-model-bytes\x00\x01\x02"

# Ten pre-made keys, like python-tuf's key rotation tests: index i is the same key in every test.
KEYS: list[SigningKey] = [SigningKey.generate() for _ in range(10)]


def profile(name: str = "generic-x86-64") -> FirmwareProfile:
    """A real shipped firmware profile."""
    return resolve_profile(name, builtin_profiles_dir())


# -- keys and roots -------------------------------------------------------------------------------------------------

@dataclass
class Fleet:
    """The keys of one test fleet and the roots it publishes. Defaults: 1-of-1 root, 1-of-1 release, 1-of-1 orders."""

    root_keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    release_keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    orders_keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])
    thresholds: dict[str, int] = field(default_factory=lambda: {"root": 1, "release": 1, "orders": 1})
    version: int = 1
    expires_at: float = NOW + 10 * YEAR

    def signed(self, **overrides: Any) -> dict[str, Any]:
        keys: dict[str, Sequence[PublicKey]] = {
            "root": [k.public for k in self.root_keys],
            "release": [k.public for k in self.release_keys],
            "orders": [k.public for k in self.orders_keys],
        }
        doc = make_root_signed(version=self.version, expires_at=self.expires_at, keys=keys,
                               thresholds=self.thresholds)
        doc.update(overrides)
        return doc

    def root_bytes(self, signers: Sequence[SigningKey] | None = None, **overrides: Any) -> bytes:
        return sign_document(self.signed(**overrides), ROOT_PREFIX,
                             self.root_keys if signers is None else signers)

    def root(self) -> TrustRoot:
        return TrustRoot.from_bytes(self.root_bytes())


# -- manifests and bundles ------------------------------------------------------------------------------------------

def tiny_schema(model: str = "toy", version: int = 1, runtime: str = "onnx",
                quantization: str = "int8") -> dict[str, Any]:
    return {
        "format": 1, "model": model, "version": version, "runtime": runtime, "quantization": quantization,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2],
                    "features": [{"name": "b", "min": 0.0, "max": 1.0}, {"name": "a", "min": 0.0, "max": 1.0}]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
    }


def tiny_baseline() -> dict[str, Any]:
    edges = Edges.uniform(0.0, 1.0, 4)
    return Summary({"b": NumericHistogram.from_values(edges, [0.1, 0.2, 0.7]),
                    "a": NumericHistogram.from_values(edges, [0.5, 0.9])}).to_dict()


def tiny_manifest(*, model: str = "toy", version: int = 1, files: Sequence[tuple[str, bytes]] | None = None,
                  created_at: float = NOW - 3600, expires_at: float = NOW + YEAR, runtime: str = "onnx",
                  profiles: Sequence[str] = ("generic-x86-64", "raspberry-pi-4"), quantization: str = "int8",
                  **overrides: Any) -> dict[str, Any]:
    """A valid manifest around a few fake model bytes; ``overrides`` replace top-level fields afterwards."""
    suffix = ".onnx" if runtime == "onnx" else ".tflite"
    files = list(files) if files is not None else [(f"model{suffix}", FAKE_MODEL)]
    doc = build_manifest(
        model=model, version=version, created_at=created_at, expires_at=expires_at, runtime=runtime,
        profiles=list(profiles), model_file=files[0][0], files=files,
        schema=tiny_schema(model, version, runtime, quantization),
        drift={"baseline": tiny_baseline(), "thresholds": {"psi_warn": 0.1, "psi_alert": 0.25, "min_samples": 200}},
        health={"inputs": {"x": [[0.5, 0.5]]}, "expected": {"y": [[0.25, 0.75]]}, "atol": 0.05,
                "top1_must_match": True, "latency_budget_ms": 50.0, "soak_s": 60.0, "max_error_rate": 0.05},
        metadata={"model_card": "toy model for tests"},
    )
    doc.update(overrides)
    return doc


def signatures(manifest_bytes: bytes, signers: Iterable[SigningKey]) -> list[dict[str, str]]:
    return [{"keyid": k.public.keyid, "sig": k.sign(MANIFEST_PREFIX + manifest_bytes)} for k in signers]


def bundle_bytes(manifest: Mapping[str, Any], files: Sequence[tuple[str, bytes]] | None,
                 signers: Iterable[SigningKey]) -> bytes:
    """A bundle written by ``write_bundle`` (``files`` default to the manifest's single fake model)."""
    manifest_bytes = canonical_json(manifest)
    if files is None:
        files = [(manifest["files"][0]["path"], FAKE_MODEL)]
    out = io.BytesIO()
    write_bundle(out, manifest_bytes, signatures(manifest_bytes, signers), files)
    return out.getvalue()


def small_bundle(fleet: Fleet, **manifest_fields: Any) -> bytes:
    """A valid, signed toy bundle of ``fleet``."""
    return bundle_bytes(tiny_manifest(**manifest_fields), None, fleet.release_keys)


class Sink:
    """Records every ``sink(path)`` call and the bytes written to each file."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.files: dict[str, io.BytesIO] = {}

    def __call__(self, path: str) -> io.BytesIO:
        self.calls.append(path)
        self.files[path] = io.BytesIO()
        return self.files[path]

    def data(self, path: str) -> bytes:
        return self.files[path].getvalue()


def verify(data: bytes, root: TrustRoot, *, now: float = NOW, sink: Sink | None = None,
           profile_name: str | None = None, chunk_size: int = 1 << 20) -> VerifiedBundle:
    return verify_bundle(io.BytesIO(data), root, now=now, sink=sink,
                         profile=profile(profile_name) if profile_name else None, chunk_size=chunk_size)


def rejection(data: bytes, root: TrustRoot, **kwargs: Any) -> BundleError:
    """The BundleError verifying ``data`` raises (fails the test if it is accepted)."""
    try:
        verify(data, root, **kwargs)
    except BundleError as exc:
        return exc
    raise AssertionError("the bundle was accepted")


# -- hand-built tar -------------------------------------------------------------------------------------------------

def tar_header(name: str | bytes, size: int, *, typeflag: bytes = b"0", mode: int = 0o644, linkname: bytes = b"",
               prefix: bytes = b"", magic: bytes = b"ustar\x0000", size_field: bytes | None = None) -> bytes:
    """A 512-byte header with a correct checksum, so only the field under test is wrong."""
    raw = name.encode() if isinstance(name, str) else name
    block = bytearray(512)
    block[0:len(raw[:100])] = raw[:100]
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = typeflag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = magic
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def tar_member(name: str | bytes, data: bytes, **header: Any) -> bytes:
    return tar_header(name, len(data), **header) + pad(data)


END = bytes(1024)


def pax_member(records: Mapping[str, str], *, typeflag: bytes = b"x") -> bytes:
    """A pax extended (``x``) or global (``g``) header member."""
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n = len(str(n)) + len(rec)
        body += str(n).encode() + rec
    return tar_member("././@PaxHeader", body, typeflag=typeflag)


def head(fleet: Fleet, manifest: Mapping[str, Any] | None = None,
         signers: Iterable[SigningKey] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The first two members (manifest and signatures) of a valid bundle, and its manifest."""
    manifest = dict(manifest) if manifest is not None else tiny_manifest()
    manifest_bytes = canonical_json(manifest)
    sigs = canonical_json({"signatures": signatures(manifest_bytes,
                                                    fleet.release_keys if signers is None else signers)})
    return tar_member("manifest.json", manifest_bytes) + tar_member("signatures.json", sigs), manifest


# -- streams --------------------------------------------------------------------------------------------------------

class CountingStream(io.RawIOBase):
    """A read-only stream over an iterator of byte pieces that counts what the reader took.

    Backed by a generator, so an "endless" or 1 GiB stream costs nothing unless it is actually read.
    """

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces: Iterator[bytes] = iter(pieces)
        self._buf = b""
        self.bytes_read = 0
        self.largest_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("the verifier must never read a stream to its end")
        while len(self._buf) < size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buf += piece
        out, self._buf = self._buf[:size], self._buf[size:]
        self.bytes_read += len(out)
        self.largest_read = max(self.largest_read, size)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def zeros(total: int, piece: int = 1 << 20) -> Iterator[bytes]:
    """``total`` zero bytes, lazily (``total`` may be huge)."""
    block = bytes(piece)
    while total > 0:
        n = min(piece, total)
        yield block if n == piece else bytes(n)
        total -= n


def endless_zeros(piece: int = 1 << 20) -> Iterator[bytes]:
    block = bytes(piece)
    while True:
        yield block


# -- orders ---------------------------------------------------------------------------------------------------------

def order_fields(bundle: bytes | None = None, vb: VerifiedBundle | None = None, **overrides: Any) -> dict[str, Any]:
    """Fields of a deploy order for ``vb`` (a verified bundle) or a placeholder bundle."""
    fields: dict[str, Any] = {
        "command_id": "cmd-17", "action": "deploy", "device_id": DEVICE, "rollout_id": "ro-1", "sequence": 17,
        "model": vb.manifest.model if vb else "toy", "version": vb.manifest.version if vb else 1,
        "bundle_digest": vb.digest if vb else "0" * 64, "bundle_length": len(bundle) if bundle else 1024,
        "url": "https://fleet.example/v1/bundles/x", "token": "opaque-token", "token_expires_at": NOW + 3600,
        "issued_at": NOW - 60, "expires_at": NOW + 86400, "allow_downgrade": False,
    }
    fields.update(overrides)
    return fields


def order_doc(fleet: Fleet, signers: Sequence[SigningKey] | None = None, **fields: Any) -> bytes:
    return sign_document(make_order_signed(**order_fields(**fields)), ORDER_PREFIX,
                         fleet.orders_keys if signers is None else signers)


# -- the real demo model --------------------------------------------------------------------------------------------

def real_model_bundle(fleet: Fleet, *, version: int = 3) -> tuple[bytes, bytes, dict[str, Any]]:
    """A bundle around the real ``cancer_mlp_int8.onnx`` with its schema, a drift baseline binned from its samples
    (quantile edges per feature, via agent.drift) and a health check on its held-out rows.

    Returns (bundle, model bytes, samples document).
    """
    model_bytes = (MODELS_DIR / "cancer_mlp_int8.onnx").read_bytes()
    schema = json.loads((MODELS_DIR / "cancer_mlp_int8.schema.json").read_text())
    samples = json.loads((MODELS_DIR / "cancer_mlp_int8.samples.json").read_text())
    schema["version"] = version
    rows = np.asarray(samples["inputs"]["features"], dtype=np.float64)
    names = [f["name"] for f in schema["inputs"][0]["features"]]
    baseline = Summary((name, NumericHistogram.from_values(Edges.quantiles(rows[:, i], 8), rows[:, i]))
                       for i, name in enumerate(names))
    expected = [[1.0 if j == top else 0.0 for j in range(2)] for top in samples["expected_top1"][:4]]
    manifest = build_manifest(
        model=schema["model"], version=version, created_at=NOW - 3600, expires_at=NOW + YEAR, runtime="onnx",
        profiles=["generic-x86-64", "raspberry-pi-4"], model_file="model.onnx", files=[("model.onnx", model_bytes)],
        schema=schema,
        drift={"baseline": baseline, "thresholds": {"psi_warn": 0.1, "psi_alert": 0.25, "min_samples": 200}},
        health={"inputs": {"features": rows[:4]}, "expected": {"probabilities": expected}, "atol": 0.5,
                "top1_must_match": True, "latency_budget_ms": 50.0, "soak_s": 60.0, "max_error_rate": 0.05},
        metadata={"model_card": "WDBC int8 MLP", "training_data": samples["model"]},
    )
    return bundle_bytes(manifest, [("model.onnx", model_bytes)], fleet.release_keys), model_bytes, samples


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
