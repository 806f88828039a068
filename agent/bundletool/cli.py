"""``edge-bundle``: make keys and trust roots, build, sign, verify and inspect model bundles.

Used in CI and by release managers (``docs/release-flow.md`` walks through a whole release). Every check here is
the same code the agent runs (``agent.bundle``): a bundle that ``edge-bundle verify`` accepts is one the device
accepts, given the same trust root, time and firmware profile.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from agent import __version__
from agent.clitools import EXIT_FAILED, EXIT_USAGE

__all__ = ["main"]

DAY = 24 * 3600


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled = sys.stderr.isatty()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 2**20:8.1f} MiB")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class _CountingReader(io.RawIOBase):
    """Wraps a file so reads advance a progress bar."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f, self._p = f, progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self._p.add(n)
        return n


class CliError(Exception):
    """A usage or input problem: printed as one line, exit code 2."""


def _die(message: str) -> CliError:
    return CliError(message)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _die(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _load_signing_key(path: Path) -> Any:
    from agent.bundle import BundleError, SigningKey

    try:
        return SigningKey.from_pem(_read(path, "key"))
    except BundleError as exc:
        raise _die(f"{path} is not an Ed25519 private key: {exc}") from None


def _load_public(path: Path) -> Any:
    """A public key from ``*.pub.json`` or derived from a private ``*.pem``."""
    from agent.bundle import BundleError, PublicKey

    data = _read(path, "key")
    if data.lstrip().startswith(b"{"):
        try:
            return PublicKey.from_dict(json.loads(data))
        except (ValueError, BundleError) as exc:
            raise _die(f"{path} is not a public key file: {exc}") from None
    return _load_signing_key(path).public


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    if path.exists():
        raise _die(f"{path} exists; refusing to overwrite it (remove it first)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- keys and roots ----------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.bundle import SigningKey

    key = SigningKey.generate()
    out: Path = args.out
    pub = out.with_name(out.name.removesuffix(".pem") + ".pub.json")
    _write_new(out, key.to_pem(), 0o600)
    _write_new(pub, json.dumps(key.public.to_dict(), indent=2).encode() + b"\n")
    print(f"wrote {out} (private, mode 0600: keep it offline or in an HSM) and {pub}")
    print(f"keyid {key.public.keyid}")
    return 0


def cmd_root_create(args: argparse.Namespace) -> int:
    from agent.bundle import ROOT_PREFIX, make_root_signed, sign_document

    keys = {"root": [_load_public(p) for p in args.root], "release": [_load_public(p) for p in args.release],
            "orders": [_load_public(p) for p in args.orders]}
    signed = make_root_signed(version=args.version, expires_at=int(time.time() + args.expires_days * DAY),
                              keys=keys, thresholds={"root": args.root_threshold,
                                                     "release": args.release_threshold,
                                                     "orders": args.orders_threshold})
    signers = [_load_signing_key(p) for p in args.sign]
    data = sign_document(signed, ROOT_PREFIX, signers)
    if args.previous is not None:  # a rotation: prove now that devices holding the previous root accept it
        from agent.bundle import BundleError, TrustRoot

        try:
            TrustRoot.from_bytes(_read(args.previous, "trust root")).update(data)
        except BundleError as exc:
            raise _die(f"devices trusting {args.previous} would refuse this root: {exc}") from None
    else:
        from agent.bundle import BundleError, TrustRoot

        try:
            TrustRoot.from_bytes(data)
        except BundleError as exc:
            raise _die(f"the new root is not valid: {exc}") from None
    _write_new(args.out, data)
    print(f"wrote {args.out}: trust root version {args.version}, expires in {args.expires_days} days")
    return 0


# -- bundles -----------------------------------------------------------------------------------------------
def _rows_from(path: Path) -> Any:
    import numpy as np

    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".csv":
        return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    doc = json.loads(_read(path, "data file"))
    if isinstance(doc, dict) and "inputs" in doc:
        doc = next(iter(doc["inputs"].values()))
    return np.asarray(doc, dtype=np.float64)


def cmd_build(args: argparse.Namespace) -> int:
    from agent.bundle import BundleError
    from agent.bundletool.build import BuildOptions, build_bundle
    from agent.model import SchemaError
    from agent.runtime import ModelLoadError

    metadata: dict[str, Any] = {}
    for kv in args.metadata:
        k, _, v = kv.partition("=")
        metadata[k] = v
    if args.model_card:
        metadata["model_card"] = _read(args.model_card, "model card").decode("utf-8", "replace")
    if args.model.suffix not in (".onnx", ".tflite"):
        raise _die(f"{args.model}: the model must be a .onnx or .tflite file")
    _read(args.model, "model")
    try:
        schema_doc = json.loads(_read(args.schema, "schema"))
    except ValueError as exc:
        raise _die(f"{args.schema} is not JSON: {exc}") from None
    options = BuildOptions(bins=args.bins, atol=args.atol, latency_budget_ms=args.latency_budget_ms,
                           soak_s=args.soak_s, max_error_rate=args.max_error_rate, psi_warn=args.psi_warn,
                           psi_alert=args.psi_alert, min_samples=args.min_samples, expires_days=args.expires_days,
                           profiles=args.profiles.split(",") if args.profiles else None, metadata=metadata)
    signers = [_load_signing_key(p) for p in args.sign]
    try:
        built = build_bundle(model=args.model, schema_doc=schema_doc, name=args.name, version=args.version,
                             reference=_rows_from(args.reference),
                             health_rows=_rows_from(args.health_samples)[: args.health_rows],
                             signers=signers, options=options)
    except (ValueError, SchemaError) as exc:
        raise _die(str(exc)) from None
    except ModelLoadError as exc:
        raise _die(f"cannot run {args.model} to compute the health-check outputs: {exc}") from None
    except BundleError as exc:
        raise _die(f"cannot build the bundle: {exc}") from None
    _write_new(args.out, built.data)
    print(f"wrote {args.out}: {args.name}@{args.version} ({len(built.data)} bytes), digest {built.digest}, "
          f"{built.signatures} signature(s), profiles {', '.join(built.profiles)}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from agent.bundle import BundleError, add_signatures

    signers = [_load_signing_key(p) for p in args.key]
    out = io.BytesIO()
    try:
        with open(args.bundle, "rb") as f:
            add_signatures(f, out, signers)
    except OSError as exc:
        raise _die(f"cannot read {args.bundle}: {exc.strerror}") from None
    except BundleError as exc:
        raise _die(f"cannot sign {args.bundle}: {exc}") from None
    target: Path = args.out or args.bundle
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(out.getvalue())
    os.replace(tmp, target)
    print(f"signed {target} with {', '.join(k.public.keyid[:16] for k in signers)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.bundle import BundleError, TrustRoot, verify_bundle
    from agent.profiles import ProfileError, builtin_profiles_dir, resolve_profile

    try:
        root = TrustRoot.from_bytes(_read(args.root, "trust root"))
        profile = resolve_profile(args.profile, builtin_profiles_dir()) if args.profile else None
    except (BundleError, ProfileError) as exc:
        raise _die(str(exc)) from None
    size = args.bundle.stat().st_size if args.bundle.exists() else 0
    progress = Progress("verifying", size)
    try:
        with open(args.bundle, "rb") as f:
            vb = verify_bundle(io.BufferedReader(_CountingReader(f, progress), 1 << 20), root,
                               now=args.at if args.at is not None else time.time(), profile=profile)
    except OSError as exc:
        raise _die(f"cannot read {args.bundle}: {exc.strerror}") from None
    except BundleError as exc:
        progress.close()
        print(f"REJECTED ({exc.reason}): {exc}", file=sys.stderr)
        return EXIT_FAILED
    progress.close()
    m = vb.manifest
    print(f"OK {m.model}@{m.version} digest {vb.digest}" + (f" (compatible with {args.profile})" if profile else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from agent.bundle import BundleError, read_manifest

    try:
        with open(args.bundle, "rb") as f:
            manifest_bytes, signatures = read_manifest(f)
    except OSError as exc:
        raise _die(f"cannot read {args.bundle}: {exc.strerror}") from None
    except BundleError as exc:
        raise _die(f"{args.bundle} is not a readable bundle: {exc}") from None
    doc = json.loads(manifest_bytes)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if args.json:
        print(json.dumps({"digest": digest, "manifest": doc, "signatures": signatures}, indent=2))
        return 0
    fmt = "%Y-%m-%d %H:%M UTC"
    print(f"model       {doc.get('model')}@{doc.get('version')} ({doc.get('runtime')})")
    print(f"digest      {digest}")
    print(f"created     {time.strftime(fmt, time.gmtime(doc.get('created_at', 0)))}")
    print(f"expires     {time.strftime(fmt, time.gmtime(doc.get('expires_at', 0)))}")
    print(f"profiles    {', '.join(doc.get('profiles', []))}")
    for f in doc.get("files", []):
        print(f"file        {f['path']}  {f['length']} bytes  sha256 {f['sha256']}")
    schema = doc.get("schema", {})
    for t in schema.get("inputs", []):
        print(f"input       {t['name']} {t['dtype']} {t['shape']} ({len(t.get('features', []))} features)")
    for t in schema.get("outputs", []):
        print(f"output      {t['name']} {t['dtype']} {t['shape']}")
    health = doc.get("health", {})
    n = len(next(iter(health.get("inputs", {}).values()), []))
    print(f"health      {n} samples, atol {health.get('atol')}, latency budget {health.get('latency_budget_ms')} ms,"
          f" soak {health.get('soak_s')} s")
    print(f"drift       {len(doc.get('drift', {}).get('baseline', {}).get('features', {}))} baseline features, "
          f"thresholds {doc.get('drift', {}).get('thresholds')}")
    print(f"signatures  {len(signatures)}: " + ", ".join(s.get('keyid', '?')[:16] for s in signatures))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-bundle", description="Build, sign, verify and inspect model bundles.")
    p.add_argument("--version", action="version", version=f"edge-bundle {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    k = sub.add_parser("keygen", help="generate an Ed25519 signing key (writes KEY.pem and KEY.pub.json)")
    k.add_argument("--out", type=Path, required=True, help="private key file to create, e.g. release-1.pem")

    r = sub.add_parser("root", help="create or rotate a trust root")
    rs = r.add_subparsers(dest="root_command", metavar="ACTION", required=True)
    rc = rs.add_parser("create", help="write a signed trust root (a rotation when --previous is given)")
    rc.add_argument("--root", type=Path, nargs="+", required=True, help="root keys (.pub.json or .pem)")
    rc.add_argument("--release", type=Path, nargs="+", required=True, help="release keys")
    rc.add_argument("--orders", type=Path, nargs="+", required=True, help="fleet-server order keys")
    rc.add_argument("--root-threshold", type=int, default=1)
    rc.add_argument("--release-threshold", type=int, default=1)
    rc.add_argument("--orders-threshold", type=int, default=1)
    rc.add_argument("--version", type=int, default=1, help="1 for a new root; previous + 1 for a rotation")
    rc.add_argument("--expires-days", type=float, default=365.0)
    rc.add_argument("--sign", type=Path, nargs="+", required=True,
                    help="private root keys that sign it (for a rotation: a threshold of the old AND the new)")
    rc.add_argument("--previous", type=Path, help="the root devices trust now (checks the rotation chain)")
    rc.add_argument("--out", type=Path, required=True)

    b = sub.add_parser("build", help="build a bundle from a model, its schema, reference data and samples")
    b.add_argument("--model", type=Path, required=True, help=".onnx or .tflite file")
    b.add_argument("--schema", type=Path, required=True, help="the model's I/O schema (docs/model-schema.md)")
    b.add_argument("--name", required=True, help="model name, e.g. cancer-mlp")
    b.add_argument("--version", type=int, required=True, help="integer version, higher than the last release")
    b.add_argument("--reference", type=Path, required=True,
                   help="reference (training) data for the drift baseline: .npy, .csv or samples .json")
    b.add_argument("--health-samples", type=Path, required=True, help="inputs for the on-device health check")
    b.add_argument("--health-rows", type=int, default=8)
    b.add_argument("--bins", type=int, default=16, help="drift baseline bins per feature")
    b.add_argument("--atol", type=float, default=0.02)
    b.add_argument("--latency-budget-ms", type=float, default=50.0)
    b.add_argument("--soak-s", type=float, default=60.0)
    b.add_argument("--max-error-rate", type=float, default=0.05)
    b.add_argument("--psi-warn", type=float, default=0.1)
    b.add_argument("--psi-alert", type=float, default=0.25)
    b.add_argument("--min-samples", type=int, default=200)
    b.add_argument("--profiles", help="comma-separated firmware profiles (default: every compatible one)")
    b.add_argument("--expires-days", type=float, default=365.0)
    b.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--model-card", type=Path)
    b.add_argument("--sign", type=Path, action="append", default=[], help="sign with this key now")
    b.add_argument("--out", type=Path, required=True)

    s = sub.add_parser("sign", help="add signatures to a bundle (k-of-n: each release manager adds theirs)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--key", type=Path, nargs="+", required=True)
    s.add_argument("--out", type=Path, help="write here instead of replacing the bundle")

    v = sub.add_parser("verify", help="verify a bundle exactly as a device would")
    v.add_argument("bundle", type=Path)
    v.add_argument("--root", type=Path, required=True, help="the trust root devices hold")
    v.add_argument("--profile", help="also check compatibility with this firmware profile")
    v.add_argument("--at", type=float, help="verify at this unix time instead of now")

    i = sub.add_parser("inspect", help="show a bundle's manifest (no trust decision)")
    i.add_argument("bundle", type=Path)
    i.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return EXIT_USAGE
    handlers = {"keygen": cmd_keygen, "build": cmd_build, "sign": cmd_sign, "verify": cmd_verify,
                "inspect": cmd_inspect, "root": cmd_root_create}
    try:
        return handlers[args.command](args)
    except CliError as exc:
        print(f"edge-bundle {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
