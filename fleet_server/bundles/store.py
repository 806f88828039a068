"""The bundle files on local disk, content-addressed: ``<bundle_dir>/sha256/<2 hex>/<file sha256>``.

The only module of the bundle store that touches the filesystem. Layout under ``bundle_dir``::

    .lock                     store lock (see below)
    tmp/upload-<random>.part  uploads being received (each locked by its uploader)
    sha256/ab/ab12...ef       one file per distinct bundle, named by the SHA-256 of its bytes

Crash safety: an upload is written to ``tmp/``, fsynced, renamed into place (``os.replace``) and the directory
fsynced, so a file under ``sha256/`` is always complete; a crash leaves at most a temporary file (removed by
:meth:`BundleStore.clean_tmp`, run before every upload and by garbage collection) or a complete file without a
database row (an orphan, removed by garbage collection).

Concurrency between uploads, deletes and garbage collection, in one process or several on the same host, uses
``flock`` (locks held by a process vanish with it, so a crash never leaves a stale lock):

* every temporary upload file is locked (exclusive) by its uploader for its whole life, so clean-up removes only
  files nobody is writing;
* placing a file and committing its row happens under the store lock held **shared**; removing files (delete,
  garbage collection) happens under it held **exclusive**, after re-reading the rows. So a file is never removed
  between an upload's rename and its commit, and an upload never places a file that a delete then unlinks.

Local POSIX filesystems only (``flock``); an object store would be another adapter with the same methods.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from agent.fsutil import fsync_dir

__all__ = ["BundleStore", "StoredFile", "TooLargeError", "Upload"]

TMP_PREFIX: Final = "upload-"
TMP_SUFFIX: Final = ".part"
TMP_MIN_AGE_S: Final = 60.0
"""Clean-up leaves temporary files younger than this alone even when unlocked: the instant between creating a
temporary file and locking it."""
_SHA_RE: Final = re.compile(r"[0-9a-f]{64}")


class TooLargeError(Exception):
    """The upload went past the size limit (``limit`` bytes)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the bundle is larger than the limit of {limit} bytes (bundle_max_bytes)")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file under ``sha256/``: its name (the SHA-256 of its bytes), size and modification time."""

    sha256: str
    path: Path
    size: int
    mtime: float


class Upload:
    """One upload being received: a locked temporary file, hashed and counted as it is written.

    ``write`` raises :class:`TooLargeError` past ``max_bytes``. ``discard`` removes the temporary file (always
    call it, e.g. in ``finally``; it is a no-op after :meth:`BundleStore.place` consumed the file) and releases
    the lock.
    """

    def __init__(self, path: Path, fh: BinaryIO, max_bytes: int) -> None:
        self.path = path
        self._fh = fh
        self._hash = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.placed = False

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.max_bytes:
            raise TooLargeError(self.max_bytes)
        self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the bytes written so far."""
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync what was written (before verifying and placing it)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def open_for_reading(self) -> BinaryIO:
        """A separate read handle on the written bytes (for verification)."""
        return self.path.open("rb")

    def discard(self) -> None:
        if not self.placed:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._fh.close()  # releases the flock

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class BundleStore:
    """The bundle files under ``root`` (see the module docstring). Directories are created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.files_dir = root / "sha256"
        self._lock_path = root / ".lock"

    def _ensure_dirs(self) -> None:
        for d in (self.root, self.tmp_dir, self.files_dir):
            d.mkdir(mode=0o750, parents=True, exist_ok=True)

    # -- paths ----------------------------------------------------------------------------------------------------

    def path_of(self, sha256: str) -> Path:
        """Where the file with this SHA-256 lives (``ValueError`` for anything but 64 lower-case hex digits)."""
        if _SHA_RE.fullmatch(sha256) is None:
            raise ValueError(f"not a SHA-256 hex digest: {sha256[:80]!r}")
        return self.files_dir / sha256[:2] / sha256

    # -- locks ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        self._ensure_dirs()
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # releases the lock

    def placing(self) -> contextlib.AbstractContextManager[None]:
        """Hold while placing a file and committing its row (shared: uploads run side by side)."""
        return self._locked(fcntl.LOCK_SH)

    def removing(self) -> contextlib.AbstractContextManager[None]:
        """Hold while deciding which files are unreferenced and removing them (exclusive)."""
        return self._locked(fcntl.LOCK_EX)

    # -- uploads --------------------------------------------------------------------------------------------------

    def new_upload(self, max_bytes: int) -> Upload:
        """A fresh, locked temporary file under ``tmp/``."""
        self._ensure_dirs()
        while True:
            path = self.tmp_dir / f"{TMP_PREFIX}{secrets.token_hex(12)}{TMP_SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # pragma: no cover - 96 random bits
                continue
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
        return Upload(path, os.fdopen(fd, "wb"), max_bytes)

    def place(self, upload: Upload) -> Path:
        """Move a finished (fsynced) upload to its content address and return the path. Call under
        :meth:`placing`. If the file is already there (same bytes, same name) the temporary file is dropped."""
        target = self.path_of(upload.sha256)
        if target.exists() and target.stat().st_size == upload.size:
            return target  # the temporary file is removed by discard()
        target.parent.mkdir(mode=0o750, exist_ok=True)
        os.replace(upload.path, target)
        upload.placed = True
        fsync_dir(target.parent)
        fsync_dir(upload.path.parent)
        return target

    # -- reading --------------------------------------------------------------------------------------------------

    def open(self, sha256: str) -> tuple[BinaryIO, int]:
        """An open read handle on a stored file and its size (``FileNotFoundError`` if it is not there)."""
        fh = self.path_of(sha256).open("rb")
        try:
            return fh, os.fstat(fh.fileno()).st_size
        except BaseException:
            fh.close()
            raise

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def files(self) -> Iterator[StoredFile]:
        """Every content-addressed file (anything else under ``sha256/`` is ignored, never removed)."""
        if not self.files_dir.is_dir():
            return
        for sub in sorted(self.files_dir.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for p in sorted(sub.iterdir()):
                if _SHA_RE.fullmatch(p.name) is None or not p.name.startswith(sub.name):
                    continue
                st = p.lstat()
                if p.is_symlink() or not p.is_file():
                    continue
                yield StoredFile(p.name, p, st.st_size, st.st_mtime)

    # -- removal --------------------------------------------------------------------------------------------------

    def remove(self, sha256: str) -> bool:
        """Remove a stored file (call under :meth:`removing`); whether it was there."""
        path = self.path_of(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
        return True

    def stale_tmp_files(self, *, now: float | None = None, min_age_s: float = TMP_MIN_AGE_S) -> list[Path]:
        """Temporary files no upload holds (their uploader finished badly or crashed), older than ``min_age_s``."""
        if not self.tmp_dir.is_dir():
            return []
        now = time.time() if now is None else now
        out = []
        for p in sorted(self.tmp_dir.iterdir()):
            if not p.is_file() or p.is_symlink():
                continue
            try:
                if now - p.stat().st_mtime < min_age_s or _is_locked(p):
                    continue
            except FileNotFoundError:
                continue
            out.append(p)
        return out

    def clean_tmp(self, *, now: float | None = None, min_age_s: float = TMP_MIN_AGE_S) -> list[Path]:
        """Remove the stale temporary files (see :meth:`stale_tmp_files`); return what was removed."""
        removed = []
        for p in self.stale_tmp_files(now=now, min_age_s=min_age_s):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
        return removed


def _is_locked(path: Path) -> bool:
    """Whether another open file description holds a flock on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)
