"""The bundle store's API (``docs/bundle-store.md``).

Under ``/api/v1`` (``router``):

* ``POST /bundles`` (release_manager): the raw bundle as the body, streamed to disk under a size cap, verified
  with the shared bundle code against the fleet's trust root, stored content-addressed. 201 for a new bundle,
  200 when the same bytes are already stored; 409 for another content under the same (model, version) or
  manifest; 413 over ``bundle_max_bytes``; 422 with the verifier's reason; 503 without a usable trust root.
* ``GET /bundles`` (viewer): paginated, optionally one model; ``GET /bundles/{digest}``: one, with its manifest
  and what references it.
* ``DELETE /bundles/{digest}`` (release_manager): 409 while referenced.
* ``POST /bundles/gc`` (admin): garbage collection (:func:`fleet_server.bundles.catalog.collect_garbage`).

For devices (``download_router``, no prefix, public: the download token is the credential):

* ``GET`` / ``HEAD /bundles/{digest}`` with ``Authorization: Bearer <download token>``: 401 without a token,
  403 for a token that is invalid, expired or for another bundle (or a revoked device), 404 for an unknown
  bundle; single-range requests (206, 416), ``Accept-Ranges``, strong ``ETag``, ``If-Range``; the file is
  streamed from disk in chunks. The token is never logged.

Every state change is audited (``bundle.upload``, ``bundle.delete``, ``bundle.gc``), refusals too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path as FsPath
from typing import Annotated, Any, BinaryIO, Final

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect

from agent.bundle import TrustRoot
from agent.protocol import IDENTIFIER_PATTERN
from fleet_server import audit
from fleet_server.api.deps import (
    ID_PATTERN,
    Admin,
    Limit,
    Principal,
    ReleaseManager,
    SettingsDep,
    Viewer,
    public,
)
from fleet_server.api.errors import error_responses
from fleet_server.bundles.catalog import (
    BundleConflictError,
    BundleInUseError,
    BundleReferences,
    collect_garbage,
    delete_bundle,
    find_references,
    record_upload,
)
from fleet_server.bundles.compat import UnknownBundleError, bundle_url
from fleet_server.bundles.metrics import METRICS
from fleet_server.bundles.ranges import RangeNotSatisfiableError, http_date, if_range_allows, parse_range
from fleet_server.bundles.store import BundleStore, TooLargeError, Upload
from fleet_server.bundles.tokens import InvalidDownloadTokenError, verify_download_token
from fleet_server.bundles.verify import (
    TrustRootUnavailableError,
    UploadRejectedError,
    VerifiedUpload,
    load_trust_root,
    verify_file,
)
from fleet_server.db import SessionDep
from fleet_server.models import BundleRecord, Device, table_of, utcnow
from fleet_server.settings import FleetSettings

__all__ = ["download_router", "router", "store_for"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["bundles"])
download_router = APIRouter(tags=["bundles"])


DIGEST_PATTERN: Final = r"^[0-9a-f]{64}$"


class _DigestConvertor(Convertor[str]):
    """Routes match ``/bundles/{digest:sha256}`` only for 64 lower-case hex digits, so ``/api/v1/bundles/gc``
    is its own path (a GET there is 405, not a digest that fails validation) and a malformed digest is 404."""

    regex = "[0-9a-f]{64}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sha256", _DigestConvertor())  # idempotent: the same convertor under the same name
Digest = Annotated[str, Path(pattern=DIGEST_PATTERN, description="bundle digest: sha256 of its manifest (hex)")]
MAX_VERSION: Final = 2**63 - 1
After = Annotated[str | None, Query(pattern=f"^{IDENTIFIER_PATTERN}@[0-9]{{1,19}}$",
                                    description="the `next` value of the previous page (opaque)")]
"""A keyset cursor: the (model, version) of the last item of the previous page. Every value the pattern admits
is usable (a cursor past the end gives an empty page), so a well-formed request is never refused."""
DEFAULT_GC_GRACE_S: Final = 7 * 86400.0
MAX_GC_GRACE_S: Final = 10 * 366 * 86400.0
CHUNK: Final = 256 * 1024
"""Bytes read from disk per step of a download, and buffered per write of an upload (up to 4 chunks)."""
_WRITE_BATCH: Final = 4 * CHUNK
_MAX_MESSAGE: Final = 1000
_BINARY: Final = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def store_for(settings: FleetSettings) -> BundleStore:
    """The bundle store of these settings (``bundle_dir``, default ``./bundles``)."""
    return BundleStore(settings.bundle_dir if settings.bundle_dir is not None else FsPath("bundles"))


# -- schemas ------------------------------------------------------------------------------------------------------


class RolloutReferencePublic(BaseModel):
    rollout_id: str
    status: str
    role: str
    """``bundle`` (the rollout deploys it) or ``rollback_target``."""


class BundleReferencesPublic(BaseModel):
    """What keeps a bundle from being deleted or collected."""

    in_use: bool
    rollouts: list[RolloutReferencePublic]
    devices_active: int
    devices_previous: int


class BundlePublic(BaseModel):
    digest: str
    """sha256 of the manifest: the bundle's identity, as deployment orders name it."""
    file_sha256: str
    """sha256 of the whole file (its name in the store, and the download's ``ETag``)."""
    model: str
    version: int
    length: int
    """File size in bytes (an order's ``bundle_length``)."""
    runtime: str | None
    profiles: list[str]
    signers: list[str]
    """Key ids of the valid release signatures found on upload."""
    created_at: datetime | None
    expires_at: datetime | None
    """The manifest's expiry: devices refuse to install it afterwards."""
    uploaded_at: datetime
    uploaded_by: str
    url: str
    """Where devices download it (``{public_url}/bundles/{digest}``, with a download token)."""


class BundleDetailPublic(BundlePublic):
    manifest: dict[str, Any]
    references: BundleReferencesPublic


class BundlePage(BaseModel):
    items: list[BundlePublic]
    next: str | None


class GcBundlePublic(BaseModel):
    digest: str
    model: str
    version: int
    length: int


class GcFilePublic(BaseModel):
    sha256: str
    length: int


class GcReportPublic(BaseModel):
    dry_run: bool
    grace_s: float
    bundles: list[GcBundlePublic]
    """Unreferenced bundles older than the grace period (removed, or that would be with ``dry_run``)."""
    orphan_files: list[GcFilePublic]
    """Stored files without a bundle row (left by a crash or an interrupted race)."""
    tmp_files: list[str]
    """Temporary upload files no upload holds."""
    bytes_freed: int
    kept_in_use: int
    kept_recent: int


def _time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _public(row: BundleRecord, settings: FleetSettings) -> dict[str, Any]:
    m = row.manifest if isinstance(row.manifest, dict) else {}
    runtime = m.get("runtime")
    return {"digest": row.digest, "file_sha256": row.file_sha256, "model": row.model, "version": row.version,
            "length": row.length, "runtime": runtime if isinstance(runtime, str) else None,
            "profiles": list(row.profiles), "signers": list(row.signers), "created_at": _time(m.get("created_at")),
            "expires_at": _time(m.get("expires_at")), "uploaded_at": row.uploaded_at,
            "uploaded_by": row.uploaded_by, "url": bundle_url(settings, row.digest)}


def _references(refs: BundleReferences) -> BundleReferencesPublic:
    return BundleReferencesPublic(
        in_use=refs.in_use, devices_active=refs.devices_active, devices_previous=refs.devices_previous,
        rollouts=[RolloutReferencePublic(rollout_id=r.rollout_id, status=r.status, role=r.role)
                  for r in refs.rollouts])


def _detail(row: BundleRecord, refs: BundleReferences, settings: FleetSettings) -> BundleDetailPublic:
    return BundleDetailPublic(**_public(row, settings), manifest=dict(row.manifest), references=_references(refs))


# -- upload -------------------------------------------------------------------------------------------------------


def _audit_failure(factory: sessionmaker[Session], *, actor: str, target: str, reason: str, message: str,
                   detail: dict[str, Any]) -> None:
    """An ``outcome=failed`` audit record in a transaction of its own (the request changed nothing)."""
    with factory() as db:
        audit.record(db, actor=actor, action="bundle.upload", target=target, outcome="failed",
                     detail={"reason": reason, "message": message[:_MAX_MESSAGE], **detail})
        db.commit()


async def _refuse(request: Request, who: Principal, code: int, reason: str, message: str, *, received: int = 0,
                  target: str = "bundles", detail: dict[str, Any] | None = None) -> HTTPException:
    """Audit and count a refused upload; the exception to raise."""
    METRICS.upload(reason, received)
    log.info("bundle upload refused", extra={"actor": who.actor, "reason": reason, "bytes": received})
    await run_in_threadpool(_audit_failure, request.app.state.sessions, actor=who.actor, target=target,
                            reason=reason, message=message, detail={"bytes": received, **(detail or {})})
    return HTTPException(code, message)


def _verify_and_record(factory: sessionmaker[Session], store: BundleStore, upload: Upload, *,
                       settings: FleetSettings, root: TrustRoot, who: Principal,
                       now: datetime) -> tuple[BundleDetailPublic, bool]:
    upload.finish()
    with upload.open_for_reading() as fh:
        verified: VerifiedUpload = verify_file(fh, root, now=now.timestamp(), size=upload.size)
    with factory() as session:
        row, created = record_upload(session, store, upload, verified, actor=who.actor, now=now)
        refs = find_references(session.connection(), row.digest)
        return _detail(row, refs, settings), created


async def _receive(request: Request, upload: Upload, limit: int) -> None:
    """Stream the request body into ``upload``: written in batches off the event loop, refused as soon as it
    passes ``limit`` (:class:`TooLargeError`)."""
    received = 0
    pending: list[bytes] = []
    buffered = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        received += len(chunk)
        if received > limit:
            raise TooLargeError(limit)
        pending.append(chunk)
        buffered += len(chunk)
        if buffered >= _WRITE_BATCH:
            data = b"".join(pending)
            pending, buffered = [], 0
            await run_in_threadpool(upload.write, data)
    if pending:
        await run_in_threadpool(upload.write, b"".join(pending))


@router.post(
    "/bundles", status_code=status.HTTP_201_CREATED, response_model=BundleDetailPublic,
    responses={200: {"model": BundleDetailPublic, "description": "The same bundle (same bytes) was already stored"},
               **error_responses(400, 409, 413, 422, 503)},
    openapi_extra={"requestBody": {"required": True, "content": _BINARY,
                                   "description": "The bundle file exactly as edge-bundle wrote it"}},
)
async def upload_bundle(request: Request, response: Response, who: ReleaseManager,
                        settings: SettingsDep) -> BundleDetailPublic:
    """Upload a signed bundle (the raw file as the body). Verified like a device verifies it (except the firmware
    profile), stored content-addressed. Audited, refusals included."""
    now = utcnow()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        raise await _refuse(request, who, status.HTTP_400_BAD_REQUEST, "bad_content_type",
                            "send the bundle file itself as the body (Content-Type: application/octet-stream), "
                            "not a form")
    try:
        root = load_trust_root(settings, now=now.timestamp())
    except TrustRootUnavailableError as exc:
        raise await _refuse(request, who, status.HTTP_503_SERVICE_UNAVAILABLE, "not_configured", str(exc)) from None
    limit = settings.bundle_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise await _refuse(request, who, status.HTTP_413_CONTENT_TOO_LARGE, "too_large",
                            f"the bundle is {int(declared)} bytes; the limit is {limit} bytes (bundle_max_bytes)",
                            detail={"declared": int(declared)})
    store = store_for(settings)
    try:
        await run_in_threadpool(store.clean_tmp)
        upload = await run_in_threadpool(store.new_upload, limit)
    except OSError as exc:
        log.error("bundle store unusable", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise await _refuse(request, who, status.HTTP_503_SERVICE_UNAVAILABLE, "storage",
                            f"the bundle store ({store.root}) cannot be written: {exc.strerror or exc}") from None
    try:
        try:
            await _receive(request, upload, limit)
        except TooLargeError as exc:
            raise await _refuse(request, who, status.HTTP_413_CONTENT_TOO_LARGE, "too_large", str(exc),
                                received=upload.size) from None
        except ClientDisconnect:
            raise await _refuse(request, who, status.HTTP_400_BAD_REQUEST, "disconnected",
                                "the client disconnected before the whole bundle arrived; nothing was stored",
                                received=upload.size) from None
        try:
            detail, created = await run_in_threadpool(_verify_and_record, request.app.state.sessions, store,
                                                      upload, settings=settings, root=root, who=who, now=now)
        except UploadRejectedError as exc:
            raise await _refuse(request, who, status.HTTP_422_UNPROCESSABLE_CONTENT, exc.reason,
                                f"invalid bundle ({exc.reason}): {exc.message}", received=upload.size) from None
        except BundleConflictError as exc:
            raise await _refuse(request, who, status.HTTP_409_CONFLICT, "conflict", str(exc),
                                received=upload.size) from None
    except OSError as exc:  # the store's disk: full, read-only, failing
        log.error("bundle store write failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise await _refuse(request, who, status.HTTP_503_SERVICE_UNAVAILABLE, "storage",
                            f"the bundle store cannot write the bundle ({exc.strerror or exc}); nothing was stored",
                            received=upload.size) from None
    finally:
        await run_in_threadpool(upload.discard)
    METRICS.upload("created" if created else "existing", detail.length)
    log.info("bundle uploaded", extra={"actor": who.actor, "digest": detail.digest, "model": detail.model,
                                       "version": detail.version, "new": created})  # not "created": a LogRecord field
    if not created:
        response.status_code = status.HTTP_200_OK
    return detail


# -- read, delete, gc ---------------------------------------------------------------------------------------------


@router.get("/bundles", response_model=BundlePage, responses=error_responses(422))
def list_bundles(session: SessionDep, _: Viewer, settings: SettingsDep,
                 model: Annotated[str | None, Query(pattern=ID_PATTERN,
                                                    description="only this model")] = None,
                 limit: Limit = 100, after: After = None) -> BundlePage:
    """Stored bundles by model name, newest version first (without manifests: see ``GET /bundles/{digest}``)."""
    b = table_of(BundleRecord)
    q = sa.select(b)
    if model is not None:
        q = q.where(b.c.model == model)
    if after is not None:
        last_model, _at, version_text = after.rpartition("@")
        last_version = min(int(version_text), MAX_VERSION)
        q = q.where(sa.or_(b.c.model > last_model, sa.and_(b.c.model == last_model, b.c.version < last_version)))
    rows = [BundleRecord.model_validate(dict(r)) for r in
            session.execute(q.order_by(b.c.model, b.c.version.desc()).limit(limit + 1)).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    return BundlePage(items=[BundlePublic(**_public(r, settings)) for r in rows],
                      next=f"{rows[-1].model}@{rows[-1].version}" if more else None)


@router.get("/bundles/{digest:sha256}", response_model=BundleDetailPublic, responses=error_responses(404))
def get_bundle(session: SessionDep, _: Viewer, settings: SettingsDep, digest: Digest) -> BundleDetailPublic:
    """One bundle with its signed manifest and what references it."""
    row = session.get(BundleRecord, digest)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle with digest {digest}")
    return _detail(row, find_references(session.connection(), digest), settings)


@router.delete("/bundles/{digest:sha256}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=error_responses(404, 409))
def remove_bundle(session: SessionDep, who: ReleaseManager, settings: SettingsDep, digest: Digest) -> Response:
    """Delete a bundle (row and file). Refused with 409 while a rollout names it or a device runs it or holds it
    as its previous version. Audited."""
    now = utcnow()
    try:
        delete_bundle(session, store_for(settings), digest, actor=who.actor, now=now)
    except UnknownBundleError:
        session.rollback()
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle with digest {digest}") from None
    except BundleInUseError as exc:
        session.rollback()
        audit.record(session, actor=who.actor, action="bundle.delete", target=f"bundle:{digest}", outcome="failed",
                     at=now, detail={"reason": "in_use", "references": exc.references.describe()[:_MAX_MESSAGE]})
        session.commit()
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/bundles/gc", response_model=GcReportPublic, responses=error_responses(422))
def run_gc(session: SessionDep, who: Admin, settings: SettingsDep,
           older_than_s: Annotated[float, Query(ge=0, le=MAX_GC_GRACE_S,
                                                description="grace period: keep unreferenced bundles uploaded "
                                                            "less than this many seconds ago")] = DEFAULT_GC_GRACE_S,
           dry_run: Annotated[bool, Query(description="report what would be removed, remove nothing")] = False,
           ) -> GcReportPublic:
    """Remove unreferenced bundles older than the grace period, stored files without a row and stale temporary
    upload files; report what was removed. Audited (``bundle.gc``)."""
    report = collect_garbage(session, store_for(settings), now=utcnow(), grace_s=older_than_s, actor=who.actor,
                             dry_run=dry_run)
    log.info("bundle gc", extra={"actor": who.actor, "bundles": len(report.bundles), "dry_run": dry_run,
                                 "orphans": len(report.orphan_files), "bytes_freed": report.bytes_freed})
    return GcReportPublic(
        dry_run=report.dry_run, grace_s=older_than_s,
        bundles=[GcBundlePublic(**b) for b in report.bundles],
        orphan_files=[GcFilePublic(**f) for f in report.orphan_files], tmp_files=report.tmp_files,
        bytes_freed=report.bytes_freed, kept_in_use=report.kept_in_use, kept_recent=report.kept_recent)


# -- device downloads ---------------------------------------------------------------------------------------------

_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": _BINARY, "description": "The whole bundle file"},
    206: {"content": _BINARY, "description": "The requested byte range (Content-Range says which)"},
    **error_responses(404, 416, 503),
}
_TOKEN_REALM: Final = 'Bearer realm="bundles"'  # noqa: S105 - an auth scheme, not a secret

AuthorizationHeader = Annotated[str | None, Header(alias="Authorization",
                                                   description="Bearer <download token from the order>")]
RangeHeader = Annotated[str | None, Header(alias="Range", description="one range: bytes=a-b, bytes=a- or bytes=-n")]
IfRangeHeader = Annotated[str | None, Header(alias="If-Range", description="the ETag (or Last-Modified) the "
                                                                            "range must match")]


class _Download:
    """What a download answers with, decided before any byte is sent."""

    def __init__(self, fh: BinaryIO, size: int, etag: str, last_modified: datetime, device_id: str) -> None:
        self.fh = fh
        self.device_id = device_id
        self.size = size
        self.etag = etag
        self.last_modified = last_modified

    def headers(self) -> dict[str, str]:
        return {"Accept-Ranges": "bytes", "ETag": self.etag, "Last-Modified": http_date(self.last_modified),
                "Cache-Control": "private, no-transform", "Content-Type": "application/octet-stream"}


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "missing download token: send 'Authorization: Bearer <token>' with the token of the "
                            "deployment order", headers={"WWW-Authenticate": _TOKEN_REALM})
    return token


def _open_download(request: Request, settings: FleetSettings, digest: str, authorization: str | None) -> _Download:
    """Authenticate the download and open the file (or raise the HTTP error). The database session is closed
    before the body streams: a long download holds no pooled connection."""
    secret = settings.download_token_secret
    if secret is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "bundle downloads are disabled: set download_token_secret (FLEET_DOWNLOAD_TOKEN_SECRET)")
    token = _bearer_token(authorization)
    try:
        claims = verify_download_token(secret, token, digest=digest, now=time.time())
    except InvalidDownloadTokenError as exc:
        log.info("bundle download refused", extra={"digest": digest, "reason": str(exc)})
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{exc}: ask the fleet server for a new order") from None
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        device = session.get(Device, claims.device_id)
        revoked = device is not None and device.revoked_at is not None
        row = None if revoked else session.get(BundleRecord, digest)
    if revoked:
        log.info("bundle download refused", extra={"digest": digest, "device": claims.device_id,
                                                   "reason": "device revoked"})
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"device {claims.device_id} is revoked")
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bundle with digest {digest} (deleted, or never uploaded)")
    try:
        fh, size = store_for(settings).open(row.file_sha256)
    except FileNotFoundError:
        log.error("bundle file missing from the store", extra={"digest": digest, "file_sha256": row.file_sha256})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the file of bundle {digest} is missing from the store; upload the bundle again") from None
    if size != row.length:
        fh.close()
        log.error("bundle file has the wrong size", extra={"digest": digest, "size": size, "expected": row.length})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the file of bundle {digest} is damaged in the store; upload the bundle again")
    return _Download(fh, size, f'"{row.file_sha256}"', row.uploaded_at, claims.device_id)


def _body(fh: BinaryIO, first: int, size: int) -> Iterator[bytes]:
    """The file's bytes ``first`` .. ``first + size - 1`` in chunks, counted as they are handed over."""
    try:
        fh.seek(first)
        left = size
        while left:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                return  # cannot happen for an immutable file; the client sees a short body and resumes
            left -= len(chunk)
            METRICS.download_sent(len(chunk))
            yield chunk
        METRICS.download_completed()
    finally:
        fh.close()


def _counted(fn: Callable[[], Response]) -> Response:
    """Count the answer of ``fn`` by status (errors included)."""
    try:
        response = fn()
    except HTTPException as exc:
        METRICS.download_request(exc.status_code)
        raise
    METRICS.download_request(response.status_code)
    return response


@download_router.get("/bundles/{digest:sha256}", dependencies=[Depends(public)], response_class=Response,
                     responses=_DOWNLOAD_RESPONSES)
def download_bundle(request: Request, settings: SettingsDep, digest: Digest, *,
                    authorization: AuthorizationHeader = None, range_: RangeHeader = None,
                    if_range: IfRangeHeader = None) -> Response:
    """Download a bundle with the download token of a deployment order; resumable with ``Range``."""
    return _counted(lambda: _get(request, settings, digest, authorization=authorization, range_=range_,
                                 if_range=if_range))


def _get(request: Request, settings: FleetSettings, digest: str, *, authorization: str | None, range_: str | None,
         if_range: str | None) -> Response:
    dl = _open_download(request, settings, digest, authorization)
    headers = dl.headers()
    try:
        wanted = parse_range(range_, dl.size) if if_range_allows(
            if_range, etag=dl.etag, last_modified=dl.last_modified) else None
    except RangeNotSatisfiableError as exc:
        dl.fh.close()
        raise HTTPException(status.HTTP_416_RANGE_NOT_SATISFIABLE, str(exc),
                            headers={"Content-Range": exc.content_range, "Accept-Ranges": "bytes"}) from None
    log.info("bundle download", extra={"digest": digest, "device": dl.device_id, "size": dl.size,
                                       "range": wanted.content_range if wanted is not None else None})
    if wanted is None:
        headers["Content-Length"] = str(dl.size)
        return StreamingResponse(_body(dl.fh, 0, dl.size), status_code=status.HTTP_200_OK, headers=headers)
    headers["Content-Length"] = str(wanted.size)
    headers["Content-Range"] = wanted.content_range
    return StreamingResponse(_body(dl.fh, wanted.first, wanted.size), status_code=status.HTTP_206_PARTIAL_CONTENT,
                             headers=headers)


@download_router.head("/bundles/{digest:sha256}", dependencies=[Depends(public)], response_class=Response,
                      responses={200: {"description": "The bundle's headers (length, ETag), no body"},
                                 **error_responses(404, 503)})
def head_bundle(request: Request, settings: SettingsDep, digest: Digest,
                authorization: AuthorizationHeader = None) -> Response:
    """The download's headers without the body (``Range`` is not evaluated for HEAD)."""
    return _counted(lambda: _head(request, settings, digest, authorization))


def _head(request: Request, settings: FleetSettings, digest: str, authorization: str | None) -> Response:
    dl = _open_download(request, settings, digest, authorization)
    dl.fh.close()
    headers = dl.headers()
    headers["Content-Length"] = str(dl.size)
    return Response(status_code=status.HTTP_200_OK, headers=headers)
