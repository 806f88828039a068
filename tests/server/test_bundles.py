"""The bundle store's upload, catalogue, delete, garbage collection and profile compatibility, with REAL signed
bundles (``tests/updater/support.make_bundle``) verified by the shared bundle code, on SQLite and PostgreSQL.

Every refusal must leave nothing behind: after it, ``bundle_dir`` holds no file but the store's lock file."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from agent.bundle import SigningKey, read_manifest
from fleet_server.app import create_app
from fleet_server.bundles import (
    NOT_REGISTERED,
    PROFILE_UNKNOWN,
    BundleStore,
    UnknownBundleError,
    bundle_url,
    incompatible_devices,
    incompatible_devices_for_bundle,
)
from fleet_server.bundles.compat import profile_not_supported
from fleet_server.models import AuditLog, BundleRecord, Device, DeviceModel, RolloutRecord, table_of, utcnow
from fleet_server.settings import FleetSettings
from tests.server.support import AUTH, TOKEN
from tests.updater.support import YEAR, Keys, make_bundle

BUNDLES = "/api/v1/bundles"
SECRET = "download-secret-0123456789abcdef0123"
PROFILES = ("generic-x86-64", "raspberry-pi-4")


@dataclass
class Release:
    data: bytes
    digest: str
    file_sha256: str


def release(data: bytes) -> Release:
    manifest_bytes, _ = read_manifest(io.BytesIO(data))
    return Release(data, hashlib.sha256(manifest_bytes).hexdigest(), hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def keys() -> Keys:
    """Two release keys, both needed (2-of-2), so 'under threshold' is a real case."""
    return Keys(release=[SigningKey.generate(), SigningKey.generate()], release_threshold=2)


@pytest.fixture(scope="module")
def made(keys: Keys) -> dict[str, Release]:
    """Real bundles, built once per module (building runs the real model for the health samples)."""
    now = time.time()
    created, expires = now - 3600, now + YEAR  # fixed, so two builds give the same manifest
    return {
        "v1": release(make_bundle(keys, version=1, profiles=PROFILES, created_at=created, expires_at=expires)),
        "v2": release(make_bundle(keys, version=2, profiles=PROFILES)),
        "v1_other": release(make_bundle(keys, version=1, profiles=PROFILES, created_at=now - 7200)),
        "v1_one_more_sig": release(make_bundle(keys, version=1, profiles=PROFILES, created_at=created,
                                               expires_at=expires, signers=[*keys.release, SigningKey.generate()])),
        "other_model": release(make_bundle(keys, model="other-model", version=5, profiles=("raspberry-pi-5",))),
        "unsigned": release(make_bundle(keys, version=3, signers=[])),
        "under_threshold": release(make_bundle(keys, version=3, signers=keys.release[:1])),
        "unknown_key": release(make_bundle(keys, version=3, signers=[SigningKey.generate(), SigningKey.generate()])),
        "expired": release(make_bundle(keys, version=3, created_at=now - 7200, expires_at=now - 60)),
    }


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return tmp_path / "bundles"


@pytest.fixture
def settings(db_url: str, tmp_path: Path, keys: Keys, bundle_dir: Path) -> FleetSettings:
    root = tmp_path / "root.json"
    root.write_bytes(keys.root_bytes())
    return FleetSettings(database_url=db_url, api_token=TOKEN, bundle_dir=bundle_dir, bundle_trust_root_file=root,
                         download_token_secret=SECRET, public_url="https://fleet.example/edge/")


def leftovers(bundle_dir: Path) -> list[str]:
    """Every file under ``bundle_dir`` except the store's lock file."""
    if not bundle_dir.exists():
        return []
    return sorted(str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file() and p.name != ".lock")


def upload(client: TestClient, data: bytes, **headers: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = client.post(BUNDLES, content=data, headers={**AUTH, "Content-Type": "application/octet-stream", **headers})
    return r.status_code, r.json()


def audits(engine: Engine, action: str) -> list[AuditLog]:
    with Session(engine) as s:
        t = table_of(AuditLog)
        rows = s.execute(sa.select(t).where(t.c.action == action).order_by(t.c.id)).mappings()
        return [AuditLog.model_validate(dict(r)) for r in rows]


def bundle_rows(engine: Engine) -> list[BundleRecord]:
    with Session(engine) as s:
        t = table_of(BundleRecord)
        return [BundleRecord.model_validate(dict(r)) for r in s.execute(sa.select(t).order_by(t.c.digest)).mappings()]


# -- upload -------------------------------------------------------------------------------------------------------


def test_upload_real_bundle_is_verified_and_stored_content_addressed(client: TestClient, engine: Engine,
                                                                    made: dict[str, Release], keys: Keys,
                                                                    bundle_dir: Path) -> None:
    b = made["v1"]
    code, body = upload(client, b.data)
    assert code == 201, body
    assert body["digest"] == b.digest and body["file_sha256"] == b.file_sha256
    assert (body["model"], body["version"], body["length"]) == ("cancer-mlp", 1, len(b.data))
    assert body["profiles"] == list(PROFILES) and body["runtime"] == "onnx"
    assert body["signers"] == sorted(k.public.keyid for k in keys.release)
    assert body["url"] == f"https://fleet.example/edge/bundles/{b.digest}"
    assert body["manifest"]["model"] == "cancer-mlp" and body["references"]["in_use"] is False
    assert body["uploaded_by"] == "token:bootstrap" and body["uploaded_at"].endswith("Z")
    stored = bundle_dir / "sha256" / b.file_sha256[:2] / b.file_sha256
    assert stored.read_bytes() == b.data
    assert leftovers(bundle_dir) == [f"sha256/{b.file_sha256[:2]}/{b.file_sha256}"]
    [row] = bundle_rows(engine)
    assert (row.digest, row.file_sha256, row.length, row.profiles) == (b.digest, b.file_sha256, len(b.data),
                                                                       list(PROFILES))
    [rec] = audits(engine, "bundle.upload")
    assert (rec.actor, rec.target, rec.outcome) == ("token:bootstrap", f"bundle:{b.digest}", "ok")
    assert rec.detail["existing"] is False and rec.detail["version"] == 1


def test_same_bundle_uploaded_again_is_idempotent(client: TestClient, engine: Engine, made: dict[str, Release],
                                                  bundle_dir: Path) -> None:
    b = made["v1"]
    first = upload(client, b.data)
    second = upload(client, b.data)
    assert (first[0], second[0]) == (201, 200)
    assert second[1] == first[1]
    assert len(bundle_rows(engine)) == 1 and len(leftovers(bundle_dir)) == 1
    assert [a.detail["existing"] for a in audits(engine, "bundle.upload")] == [False, True]


def test_reupload_restores_a_file_lost_from_the_store(client: TestClient, made: dict[str, Release],
                                                      bundle_dir: Path) -> None:
    b = made["v1"]
    assert upload(client, b.data)[0] == 201
    path = bundle_dir / "sha256" / b.file_sha256[:2] / b.file_sha256
    path.unlink()
    code, _ = upload(client, b.data)
    assert code == 200 and path.read_bytes() == b.data


@pytest.mark.parametrize("other", ["v1_other", "v1_one_more_sig"])
def test_same_model_version_with_other_content_conflicts(client: TestClient, engine: Engine,
                                                         made: dict[str, Release], bundle_dir: Path,
                                                         other: str) -> None:
    """A (model, version) is immutable: other content (a rebuilt manifest, or the same manifest with other
    signatures) is refused with 409 and leaves nothing behind."""
    assert upload(client, made["v1"].data)[0] == 201
    before = leftovers(bundle_dir)
    code, body = upload(client, made[other].data)
    assert code == 409, body
    assert "version 1" in body["detail"]
    assert leftovers(bundle_dir) == before
    assert [r.digest for r in bundle_rows(engine)] == [made["v1"].digest]
    failed = [a for a in audits(engine, "bundle.upload") if a.outcome == "failed"]
    assert [a.detail["reason"] for a in failed] == ["conflict"]


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _last_digit_of_created_at(data: bytes) -> int:
    """Offset of the last digit of the manifest's ``created_at``: flipping its low bit keeps the manifest valid,
    canonical JSON, so only the signature can catch it."""
    key = data.index(b'"created_at":') + len(b'"created_at":')
    end = data.index(b",", key)
    assert data[key:end].isdigit()
    return end - 1


REFUSALS: dict[str, tuple[Callable[[dict[str, Release]], bytes], str]] = {
    # case: (how to get the bytes, the verifier's reason in the answer)
    "unsigned": (lambda m: m["unsigned"].data, "signature"),
    "under_threshold": (lambda m: m["under_threshold"].data, "signature"),
    "unknown_key": (lambda m: m["unknown_key"].data, "signature"),
    "expired_manifest": (lambda m: m["expired"].data, "stale"),
    "tampered_payload": (lambda m: _flip(m["v2"].data, len(m["v2"].data) - 2048), "digest"),
    "tampered_manifest": (lambda m: _flip(m["v2"].data, _last_digit_of_created_at(m["v2"].data)), "signature"),
    "truncated": (lambda m: m["v2"].data[:-1536], "size"),
    "trailing_data": (lambda m: m["v2"].data + b"\0" * 512, "trailing_data"),
    "garbage": (lambda m: os.urandom(5000), "malformed"),
    "empty": (lambda m: b"", "size"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_invalid_bundle_refused_with_reason_and_nothing_kept(client: TestClient, engine: Engine,
                                                             made: dict[str, Release], bundle_dir: Path,
                                                             case: str) -> None:
    make, reason = REFUSALS[case]
    code, body = upload(client, make(made))
    assert code == 422, body
    assert body["detail"].startswith(f"invalid bundle ({reason}): "), body
    assert leftovers(bundle_dir) == []
    assert bundle_rows(engine) == []
    [rec] = audits(engine, "bundle.upload")
    assert (rec.outcome, rec.detail["reason"]) == ("failed", reason)


def test_oversized_upload_refused_up_front_and_while_streaming(settings: FleetSettings, engine: Engine,
                                                               made: dict[str, Release], bundle_dir: Path) -> None:
    data = made["v1"].data
    small = settings.with_changes(bundle_max_bytes=len(data) - 1)
    with TestClient(create_app(small, engine=engine)) as c:
        declared = c.post(BUNDLES, content=data, headers=AUTH)  # Content-Length says it all
        assert declared.status_code == 413 and "bundle_max_bytes" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the cap is passed
            for i in range(0, len(data), 4096):
                yield data[i:i + 4096]
        streamed = c.post(BUNDLES, content=chunks(), headers=AUTH)
        assert streamed.status_code == 413
    assert leftovers(bundle_dir) == [] and bundle_rows(engine) == []
    assert [(a.outcome, a.detail["reason"]) for a in audits(engine, "bundle.upload")] == [("failed", "too_large")] * 2
    exact = settings.with_changes(bundle_max_bytes=len(data))
    with TestClient(create_app(exact, engine=engine)) as c:
        assert c.post(BUNDLES, content=data, headers=AUTH).status_code == 201


def test_upload_without_usable_trust_root_is_503_naming_the_setting(settings: FleetSettings, engine: Engine,
                                                                    made: dict[str, Release], tmp_path: Path,
                                                                    keys: Keys) -> None:
    bad = tmp_path / "bad-root.json"
    bad.write_bytes(b'{"signed": {}}')
    expired = tmp_path / "expired-root.json"
    expired.write_bytes(keys.root_bytes(expires_at=time.time() - 10))
    cases = [(None, "set bundle_trust_root_file"), (tmp_path / "missing.json", "cannot be read"),
             (bad, "not a usable trust root"), (expired, "expired")]
    for root, expected in cases:
        with TestClient(create_app(settings.with_changes(bundle_trust_root_file=root), engine=engine)) as c:
            r = c.post(BUNDLES, content=made["v1"].data, headers=AUTH)
        assert r.status_code == 503 and expected in r.json()["detail"], (root, r.json())
    assert bundle_rows(engine) == []
    assert [a.detail["reason"] for a in audits(engine, "bundle.upload")] == ["not_configured"] * 4


def test_unwritable_store_is_503_and_audited(settings: FleetSettings, engine: Engine, made: dict[str, Release],
                                             tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_bytes(b"")
    with TestClient(create_app(settings.with_changes(bundle_dir=not_a_dir / "bundles"), engine=engine)) as c:
        r = c.post(BUNDLES, content=made["v1"].data, headers=AUTH)
    assert r.status_code == 503 and "cannot be written" in r.json()["detail"]
    assert [a.detail["reason"] for a in audits(engine, "bundle.upload")] == ["storage"]


def test_upload_as_a_form_is_refused(client: TestClient, made: dict[str, Release]) -> None:
    r = client.post(BUNDLES, content=made["v1"].data,
                    headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "application/octet-stream" in r.json()["detail"]


def test_stale_temporary_files_are_cleaned_before_an_upload(client: TestClient, made: dict[str, Release],
                                                            bundle_dir: Path) -> None:
    """A crash mid-upload leaves a temporary file; the next upload removes it (a locked one, an upload in
    progress, stays)."""
    tmp = bundle_dir / "tmp"
    tmp.mkdir(parents=True)
    crashed, busy = tmp / "upload-crashed.part", tmp / "upload-busy.part"
    for p in (crashed, busy):
        p.write_bytes(b"partial")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    with busy.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert upload(client, made["v1"].data)[0] == 201
        assert not crashed.exists() and busy.exists()


# -- list and get -------------------------------------------------------------------------------------------------


def test_list_is_paginated_and_filtered_by_model(client: TestClient, made: dict[str, Release]) -> None:
    for name in ("v1", "v2", "other_model"):
        assert upload(client, made[name].data)[0] == 201
    seen = []
    after = None
    while True:
        params: dict[str, str | int] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get(BUNDLES, params=params, headers=AUTH).json()
        assert "manifest" not in page["items"][0]
        seen += [(i["model"], i["version"]) for i in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == [("cancer-mlp", 2), ("cancer-mlp", 1), ("other-model", 5)]
    only = client.get(BUNDLES, params={"model": "other-model"}, headers=AUTH).json()
    assert [i["digest"] for i in only["items"]] == [made["other_model"].digest] and only["next"] is None
    assert client.get(BUNDLES, params={"after": "zzz@1"}, headers=AUTH).json() == {"items": [], "next": None}
    for bad in ({"after": "not a cursor"}, {"limit": 0}, {"limit": 1001}, {"model": "Bad Name"}):
        assert client.get(BUNDLES, params=bad, headers=AUTH).status_code == 422, bad
    assert client.get(BUNDLES).status_code == 401


def test_get_one_bundle_with_manifest_and_references(client: TestClient, made: dict[str, Release]) -> None:
    b = made["v1"]
    upload(client, b.data)
    body = client.get(f"{BUNDLES}/{b.digest}", headers=AUTH).json()
    assert body["digest"] == b.digest and body["manifest"]["version"] == 1
    assert body["references"] == {"in_use": False, "rollouts": [], "devices_active": 0, "devices_previous": 0}
    assert client.get(f"{BUNDLES}/{'0' * 64}", headers=AUTH).status_code == 404
    assert client.get(f"{BUNDLES}/NOTHEX", headers=AUTH).status_code == 404  # not a digest: no such path
    gc_get = client.get(f"{BUNDLES}/gc", headers=AUTH)  # /bundles/gc is its own path, POST only
    assert gc_get.status_code == 405 and gc_get.headers["allow"] == "POST"


# -- references, delete, gc ---------------------------------------------------------------------------------------


def add_device(engine: Engine, device_id: str, profile: str | None = None, **models: tuple[int, int | None]) -> None:
    now = utcnow()
    with Session(engine) as s:
        s.add(Device(id=device_id, firmware_profile=profile))
        s.flush()
        for model, (version, previous) in models.items():
            s.add(DeviceModel(device_id=device_id, model=model.replace("_", "-"), version=version,
                              previous_version=previous, changed_at=now))
        s.commit()


def add_rollout(engine: Engine, rollout_id: str, bundle: Release, status: str, *,
                rollback_to: Release | None = None) -> None:
    now = utcnow()
    with Session(engine) as s:
        row = s.get(BundleRecord, bundle.digest)
        assert row is not None
        s.add(RolloutRecord(id=rollout_id, bundle_digest=bundle.digest, model=row.model, version=row.version,
                            status=status, created_at=now, created_by="test", updated_at=now,
                            rollback_to=None if rollback_to is None else {
                                "model": row.model, "version": 1, "bundle_digest": rollback_to.digest}))
        s.commit()


@pytest.mark.parametrize("status", ["draft", "running", "paused", "completed", "aborted"])
def test_delete_refused_while_a_rollout_names_the_bundle(client: TestClient, engine: Engine,
                                                         made: dict[str, Release], bundle_dir: Path,
                                                         status: str) -> None:
    b = made["v1"]
    upload(client, b.data)
    add_rollout(engine, "ro-1", b, status)
    r = client.delete(f"{BUNDLES}/{b.digest}", headers=AUTH)
    assert r.status_code == 409 and f"rollout ro-1 ({status})" in r.json()["detail"]
    assert len(bundle_rows(engine)) == 1 and len(leftovers(bundle_dir)) == 1
    [rec] = audits(engine, "bundle.delete")
    assert (rec.outcome, rec.detail["reason"]) == ("failed", "in_use")
    refs = client.get(f"{BUNDLES}/{b.digest}", headers=AUTH).json()["references"]
    assert refs["in_use"] and refs["rollouts"] == [{"rollout_id": "ro-1", "status": status, "role": "bundle"}]


def test_delete_refused_for_the_rollback_target_of_a_rolled_back_rollout(client: TestClient, engine: Engine,
                                                                         made: dict[str, Release]) -> None:
    upload(client, made["v1"].data)
    upload(client, made["v2"].data)
    add_rollout(engine, "ro-2", made["v2"], "rolled_back", rollback_to=made["v1"])
    r = client.delete(f"{BUNDLES}/{made['v1'].digest}", headers=AUTH)
    assert r.status_code == 409 and "rollback target" in r.json()["detail"]


@pytest.mark.parametrize("on_device", [(1, None), (2, 1)], ids=["active", "previous"])
def test_delete_refused_while_a_device_runs_or_can_roll_back_to_it(client: TestClient, engine: Engine,
                                                                   made: dict[str, Release],
                                                                   on_device: tuple[int, int | None]) -> None:
    b = made["v1"]
    upload(client, b.data)
    add_device(engine, "cam-1", cancer_mlp=on_device)
    r = client.delete(f"{BUNDLES}/{b.digest}", headers=AUTH)
    which = "active on 1 device" if on_device[0] == 1 else "previous version on 1 device"
    assert r.status_code == 409 and which in r.json()["detail"]


def test_delete_unreferenced_bundle_removes_row_and_file(client: TestClient, engine: Engine,
                                                         made: dict[str, Release], bundle_dir: Path) -> None:
    upload(client, made["v1"].data)
    upload(client, made["v2"].data)
    add_device(engine, "cam-1", cancer_mlp=(2, None))  # v2 in use, v1 not (no previous)
    r = client.delete(f"{BUNDLES}/{made['v1'].digest}", headers=AUTH)
    assert r.status_code == 204
    assert [row.digest for row in bundle_rows(engine)] == [made["v2"].digest]
    assert leftovers(bundle_dir) == [f"sha256/{made['v2'].file_sha256[:2]}/{made['v2'].file_sha256}"]
    [rec] = audits(engine, "bundle.delete")
    assert (rec.outcome, rec.target) == ("ok", f"bundle:{made['v1'].digest}")
    assert client.delete(f"{BUNDLES}/{made['v1'].digest}", headers=AUTH).status_code == 404


def _age(engine: Engine, bundle: Release, days: float) -> None:
    with engine.begin() as conn:
        t = table_of(BundleRecord)
        conn.execute(sa.update(t).where(t.c.digest == bundle.digest).values(
            uploaded_at=utcnow() - timedelta(days=days)))


def test_gc_removes_only_old_unreferenced_bundles_orphans_and_stale_tmp(client: TestClient, engine: Engine,
                                                                        made: dict[str, Release],
                                                                        bundle_dir: Path) -> None:
    for name in ("v1", "v2", "other_model"):
        assert upload(client, made[name].data)[0] == 201
    _age(engine, made["v1"], 30)           # old, unreferenced: collected
    _age(engine, made["v2"], 30)           # old, but a rollout names it: kept
    add_rollout(engine, "ro-1", made["v2"], "running")
    # other_model: unreferenced but recent: kept by the grace period
    store = BundleStore(bundle_dir)
    orphan = made["v1_one_more_sig"]       # a complete file without a row (a crash between rename and commit)
    orphan_path = store.path_of(orphan.file_sha256)
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(orphan.data)
    stale = bundle_dir / "tmp" / "upload-dead.part"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    dry = client.post(f"{BUNDLES}/gc", params={"older_than_s": 86400, "dry_run": True}, headers=AUTH).json()
    assert [b["digest"] for b in dry["bundles"]] == [made["v1"].digest]
    assert [f["sha256"] for f in dry["orphan_files"]] == [orphan.file_sha256]
    assert dry["tmp_files"] == ["upload-dead.part"] and (dry["kept_in_use"], dry["kept_recent"]) == (1, 1)
    assert dry["bytes_freed"] == len(made["v1"].data) + len(orphan.data) + 100
    assert len(bundle_rows(engine)) == 3 and orphan_path.exists() and stale.exists()
    assert audits(engine, "bundle.gc") == []

    report = client.post(f"{BUNDLES}/gc", params={"older_than_s": 86400}, headers=AUTH).json()
    assert report["dry_run"] is False and [b["digest"] for b in report["bundles"]] == [made["v1"].digest]
    assert report["bytes_freed"] == len(made["v1"].data) + len(orphan.data) + 100
    assert sorted(r.digest for r in bundle_rows(engine)) == sorted([made["v2"].digest, made["other_model"].digest])
    assert leftovers(bundle_dir) == sorted(f"sha256/{b.file_sha256[:2]}/{b.file_sha256}"
                                           for b in (made["v2"], made["other_model"]))
    [rec] = audits(engine, "bundle.gc")
    assert rec.outcome == "ok" and rec.detail["bundles"] == [made["v1"].digest]
    assert rec.detail["orphan_files"] == [orphan.file_sha256]
    again = client.post(f"{BUNDLES}/gc", params={"older_than_s": 0}, headers=AUTH).json()
    assert [b["digest"] for b in again["bundles"]] == [made["other_model"].digest]
    assert client.post(f"{BUNDLES}/gc", params={"older_than_s": -1}, headers=AUTH).status_code == 422


# -- profile compatibility ----------------------------------------------------------------------------------------


def test_incompatible_devices_by_profile() -> None:
    devices = {"a": "raspberry-pi-4", "b": "coral-dev-board", "c": None, "d": "generic-x86-64"}
    assert incompatible_devices(PROFILES, devices) == {"b": profile_not_supported("coral-dev-board"),
                                                       "c": PROFILE_UNKNOWN}
    assert incompatible_devices(PROFILES, {}) == {}
    assert incompatible_devices([], {"a": "raspberry-pi-4"}) == {"a": "profile 'raspberry-pi-4' not supported"}


def test_incompatible_devices_for_a_stored_bundle(client: TestClient, engine: Engine,
                                                  made: dict[str, Release]) -> None:
    upload(client, made["v1"].data)
    add_device(engine, "pi4", "raspberry-pi-4")
    add_device(engine, "coral", "coral-dev-board")
    add_device(engine, "mystery")
    with engine.connect() as conn:
        got = incompatible_devices_for_bundle(conn, made["v1"].digest, ["pi4", "coral", "mystery", "ghost", "pi4"])
        assert got == {"coral": "profile 'coral-dev-board' not supported", "mystery": PROFILE_UNKNOWN,
                       "ghost": NOT_REGISTERED}
        assert incompatible_devices_for_bundle(conn, made["v1"].digest, ["pi4"]) == {}
        with pytest.raises(UnknownBundleError):
            incompatible_devices_for_bundle(conn, "0" * 64, ["pi4"])


def test_bundle_url_joins_public_url_and_digest(settings: FleetSettings) -> None:
    assert bundle_url(settings, "ab" * 32) == f"https://fleet.example/edge/bundles/{'ab' * 32}"
    plain = settings.with_changes(public_url="http://10.0.0.1:8080")
    assert bundle_url(plain, "cd" * 32) == f"http://10.0.0.1:8080/bundles/{'cd' * 32}"
