"""The bundle file: a deterministic POSIX ustar archive, written and verified by hand, never by ``tarfile``.

Layout (``docs/bundle-format.md``): ``manifest.json``, ``signatures.json``, then ``payload/<path>`` for every
manifest file in manifest order, then exactly two zero blocks. Every member is a regular file, mode 0644.

Why parse tar ourselves: a general tar reader follows links, creates devices and directories, understands pax and
GNU extensions that rename members or change their size, and happily reads past what was declared. Here each
512-byte header is checked (checksum, magic, type, name, mode, size) against the one member that may come next, the
size is compared with the signed manifest *before* a byte of the member is read, payload bytes are streamed to the
caller's sink in bounded chunks while hashed, and reading stops at the end-of-archive marker: trailing data is never
read. Nothing here touches the filesystem.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Final, NamedTuple

from agent.bundle.canonical import canonical_json, strict_loads
from agent.bundle.errors import (
    DigestError,
    ExpiredError,
    ExtraMemberError,
    FormatError,
    MemberError,
    MissingMemberError,
    SizeError,
)
from agent.bundle.keys import MANIFEST_PREFIX, SigningKey, parse_signature_list
from agent.bundle.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURES_BYTES, FileEntry, Manifest
from agent.bundle.rules import check_compatible
from agent.bundle.trust import TrustRoot
from agent.profiles import FirmwareProfile

__all__ = [
    "BLOCK_SIZE",
    "MANIFEST_NAME",
    "SIGNATURES_NAME",
    "VerifiedBundle",
    "add_signatures",
    "read_manifest",
    "verify_bundle",
    "write_bundle",
]

BLOCK_SIZE: Final = 512
MANIFEST_NAME: Final = "manifest.json"
SIGNATURES_NAME: Final = "signatures.json"
_ZERO: Final = bytes(BLOCK_SIZE)
_MODE: Final = 0o644
_COPY_CHUNK: Final = 1 << 20
_OCTAL_RE: Final = re.compile(rb"([0-7]+)[\0 ]*")
_TYPE_NAMES: Final[Mapping[bytes, str]] = {
    b"\0": "pre-POSIX regular file (type NUL)", b"1": "hard link", b"2": "symbolic link",
    b"3": "character device", b"4": "block device", b"5": "directory", b"6": "FIFO", b"7": "contiguous file",
    b"x": "pax extended header", b"g": "pax global header", b"L": "GNU long name header",
    b"K": "GNU long link-name header",
}


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle that passed every check: its manifest, the exact signed manifest bytes, its identity
    (``digest = sha256(manifest bytes)``) and the number of archive bytes read (``length``)."""

    manifest: Manifest
    manifest_bytes: bytes
    digest: str
    length: int


class _Header(NamedTuple):
    name: str
    size: int


# -- reading --------------------------------------------------------------------------------------------------------

class _Reader:
    """Exact reads from a stream, counting every byte (so callers can prove what was read)."""

    __slots__ = ("_stream", "count")

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.count = 0

    def read_exact(self, n: int, what: str) -> bytes:
        if n <= 0:
            return b""
        first = self._stream.read(n)
        if first and len(first) == n:
            self.count += n
            return bytes(first)
        buf = bytearray()
        chunk = first
        while True:
            if not chunk:
                raise SizeError(f"the bundle ends after {self.count} bytes, inside {what}: the file is truncated "
                                "(shorter than its headers declare); download it again")
            if len(chunk) > n - len(buf):
                raise FormatError("the input stream returned more bytes than requested")
            buf += chunk
            self.count += len(chunk)
            if len(buf) == n:
                return bytes(buf)
            chunk = self._stream.read(n - len(buf))


def _octal(field: bytes, what: str) -> int:
    m = _OCTAL_RE.fullmatch(field)
    if m is None:
        raise FormatError(f"{what}: tar numeric field {field!r} is not octal")
    return int(m.group(1), 8)


def _size_field(field: bytes, what: str) -> int:
    if field[0] & 0x80:  # base-256 (GNU/star): 0x80 then a big-endian number; 0xff would be negative
        if field[0] != 0x80:
            raise FormatError(f"{what}: tar size field is not a non-negative base-256 number (first byte "
                              f"{field[0]:#04x}, must be 0x80)")
        return int.from_bytes(field[1:], "big")
    return _octal(field, what)


def _name_field(raw: bytes, where: str) -> str:
    nul = raw.find(b"\0")
    if nul >= 0 and any(raw[nul:]):
        raise MemberError(f"{where}: the member name contains a NUL byte followed by more characters "
                          f"({raw.rstrip(bytes(1))!r}); names with NUL are refused")
    name_bytes = raw if nul < 0 else raw[:nul]
    try:
        name = name_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise MemberError(f"{where}: member name {name_bytes!r} is not ASCII") from None
    if not name:
        raise MemberError(f"{where}: member with an empty name")
    if name.startswith("/"):
        raise MemberError(f"{where}: member name {name!r} is an absolute path")
    if ".." in name.split("/"):
        raise MemberError(f"{where}: member name {name!r} climbs out with '..'")
    return name


def _parse_header(block: bytes, where: str) -> _Header:
    """Validate one non-zero 512-byte header; only a regular, mode-0644 ustar file with a plain name passes."""
    total = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if block[148:156] != b"%06o\0 " % total:
        raise FormatError(f"{where}: tar header checksum mismatch: the header is corrupted or not a tar header")
    if block[257:265] != b"ustar\x0000":
        raise FormatError(f"{where}: not a POSIX ustar header (magic {block[257:265]!r})")
    typeflag = block[156:157]
    if typeflag != b"0":
        kind = _TYPE_NAMES.get(typeflag, f"member of type {typeflag!r}")
        raise MemberError(f"{where}: the archive holds a {kind}; a bundle holds regular files only")
    name = _name_field(block[0:100], where)
    if any(block[345:500]):
        raise MemberError(f"{where}: member {name!r} uses the ustar name prefix (a name over 100 characters)")
    mode = _octal(block[100:108], f"{where} mode")
    if mode != _MODE:
        raise MemberError(f"{where}: member {name!r} has mode {mode:o}; bundle members have mode 644")
    return _Header(name, _size_field(block[124:136], f"{where} size"))


def _next_header(reader: _Reader, where: str) -> _Header | None:
    block = reader.read_exact(BLOCK_SIZE, f"the tar header of {where}")
    return None if block == _ZERO else _parse_header(block, where)


def _read_padding(reader: _Reader, size: int, what: str) -> None:
    pad = reader.read_exact(-size % BLOCK_SIZE, f"the padding of {what}")
    if any(pad):
        raise FormatError(f"the block padding after {what} is not zero")


def _read_small(reader: _Reader, header: _Header, cap: int) -> bytes:
    if header.size > cap:
        raise SizeError(f"{header.name} is {header.size} bytes; at most {cap} are allowed")
    data = reader.read_exact(header.size, header.name)
    _read_padding(reader, header.size, header.name)
    return data


def _read_head(reader: _Reader) -> tuple[bytes, Any, list[dict[str, str]]]:
    """Members 1 and 2: manifest bytes (strictly parsed, canonical) and the signature list (shape checked)."""
    first = _next_header(reader, "member 1")
    if first is None:
        raise MissingMemberError("the archive is empty: a bundle starts with manifest.json")
    if first.name != MANIFEST_NAME:
        raise MissingMemberError(f"the first member is {first.name!r}; a bundle starts with {MANIFEST_NAME}")
    manifest_bytes = _read_small(reader, first, MAX_MANIFEST_BYTES)
    try:
        doc = strict_loads(manifest_bytes)
    except FormatError as exc:
        raise FormatError(f"{MANIFEST_NAME}: {exc.message}") from None
    second = _next_header(reader, "member 2")
    if second is None:
        raise MissingMemberError(f"the archive ends after {MANIFEST_NAME}; {SIGNATURES_NAME} must follow it")
    if second.name == MANIFEST_NAME:
        raise ExtraMemberError(f"{MANIFEST_NAME} appears twice")
    if second.name != SIGNATURES_NAME:
        raise MissingMemberError(f"the second member is {second.name!r}; {SIGNATURES_NAME} must follow "
                                 f"{MANIFEST_NAME}")
    sig_bytes = _read_small(reader, second, MAX_SIGNATURES_BYTES)
    try:
        sig_doc = strict_loads(sig_bytes)
        if not isinstance(sig_doc, dict) or set(sig_doc) != {"signatures"}:
            raise FormatError('must be an object {"signatures": [...]}')
        sigs = parse_signature_list(sig_doc["signatures"])
    except FormatError as exc:
        raise FormatError(f"{SIGNATURES_NAME}: {exc.message}") from None
    return manifest_bytes, doc, sigs


def _write_all(out: IO[bytes], data: bytes) -> None:
    """Write every byte (a raw stream may accept fewer than offered)."""
    written = out.write(data)
    if written is None or written >= len(data):
        return
    view = memoryview(data)[written:]
    while view:
        n = out.write(view)
        if not n:
            raise OSError("the output stream accepted no bytes")
        view = view[n:]


_Write = Callable[[bytes], None]


def _stream_payloads(reader: _Reader, manifest: Manifest, chunk_size: int,
                     open_file: Callable[[FileEntry], _Write | None],
                     close_file: Callable[[FileEntry], None] | None = None) -> None:
    """Check and stream every payload member. Each file's final chunk is handed over only after its SHA-256
    matched, so a sink never holds a complete file with the wrong contents."""
    names = [f.member_name for f in manifest.files]
    seen = {MANIFEST_NAME, SIGNATURES_NAME}
    for i, entry in enumerate(manifest.files):
        where = f"member {i + 3} (expected {entry.member_name})"
        header = _next_header(reader, where)
        if header is None:
            raise MissingMemberError(f"the archive ends before {entry.member_name}; the manifest declares "
                                     f"{len(names)} payload file(s)")
        if header.name != entry.member_name:
            if header.name in seen:
                raise ExtraMemberError(f"member {header.name!r} appears twice")
            if header.name in names[i + 1:]:
                raise MissingMemberError(f"found {header.name!r} where {entry.member_name!r} must be: payload "
                                         "members follow manifest order and none may be missing")
            raise ExtraMemberError(f"member {header.name!r} is not declared by the manifest (expected "
                                   f"{entry.member_name!r})")
        if header.size != entry.length:
            raise SizeError(f"{entry.member_name}: the tar header says {header.size} bytes but the signed manifest "
                            f"declares {entry.length}")
        seen.add(header.name)
        write = open_file(entry)
        digest = hashlib.sha256()
        remaining = entry.length
        pending: bytes | None = None
        while remaining:
            chunk = reader.read_exact(min(chunk_size, remaining), entry.member_name)
            digest.update(chunk)
            remaining -= len(chunk)
            if write is not None:
                if pending is not None:
                    write(pending)
                pending = chunk
        _read_padding(reader, entry.length, entry.member_name)
        if digest.hexdigest() != entry.sha256:
            raise DigestError(f"{entry.member_name}: SHA-256 {digest.hexdigest()} differs from the signed manifest's "
                              f"{entry.sha256}: the file was altered or belongs to another version")
        if write is not None and pending is not None:
            write(pending)
        if close_file is not None:
            close_file(entry)


def _expect_end(reader: _Reader) -> None:
    block = reader.read_exact(BLOCK_SIZE, "the end-of-archive marker")
    if block != _ZERO:
        header = _parse_header(block, "the member after the last payload file")
        raise ExtraMemberError(f"member {header.name!r} follows the last payload file; the manifest declares no "
                               "such member")
    if reader.read_exact(BLOCK_SIZE, "the end-of-archive marker") != _ZERO:
        raise FormatError("the archive must end with two zero blocks")


def read_manifest(stream: BinaryIO) -> tuple[bytes, list[dict[str, str]]]:
    """The manifest bytes and signature list of a bundle, for inspection: archive structure and JSON shape are
    checked, trust is **not** (use :func:`verify_bundle` before acting on anything)."""
    manifest_bytes, _doc, sigs = _read_head(_Reader(stream))
    return manifest_bytes, sigs


def verify_bundle(stream: BinaryIO, root: TrustRoot, *, now: float, profile: FirmwareProfile | None = None,
                  sink: Callable[[str], BinaryIO] | None = None, chunk_size: int = 1 << 20) -> VerifiedBundle:
    """Verify a bundle in one pass, failing as early as possible; return it or raise a :class:`BundleError`.

    Order: trust root not expired at ``now``; ``manifest.json`` (header size <= 1 MiB, strict canonical JSON);
    ``signatures.json`` (<= 64 KiB) with a threshold of valid ``release`` signatures; manifest fields, expiry and,
    with ``profile``, compatibility; then each payload member (exact expected name, regular file, header size equal
    to the signed length, else abort before reading it) streamed in ``chunk_size`` pieces to ``sink(path)`` while
    hashed; finally the two zero blocks. Bytes after them are never read.

    ``sink`` is called once per payload file, after all checks that need no payload bytes have passed; it returns a
    binary stream the bytes are written to (the caller closes/fsyncs it, and discards everything on any error). A
    file's last chunk is written only after its SHA-256 matched. ``now`` is the trusted time
    (:func:`~agent.bundle.trusted_now`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    root.check_not_expired(now)
    reader = _Reader(stream)
    manifest_bytes, doc, sigs = _read_head(reader)
    root.verify_role("release", MANIFEST_PREFIX, manifest_bytes, sigs)
    manifest = Manifest.from_dict(doc)
    if not manifest.expires_at > now:
        raise ExpiredError(f"{manifest.model}@{manifest.version}: the manifest expired at {manifest.expires_at:.0f}, "
                           f"trusted time is {now:.0f}; ask for a freshly signed bundle")
    if profile is not None:
        check_compatible(manifest, profile)

    def open_file(entry: FileEntry) -> _Write | None:
        if sink is None:
            return None
        target = sink(entry.path)
        return lambda data: _write_all(target, data)

    _stream_payloads(reader, manifest, chunk_size, open_file)
    _expect_end(reader)
    return VerifiedBundle(manifest, manifest_bytes, hashlib.sha256(manifest_bytes).hexdigest(), reader.count)


# -- writing --------------------------------------------------------------------------------------------------------

def _size_bytes(size: int) -> bytes:
    if size < 8**11:
        return b"%011o\0" % size
    return b"\x80" + size.to_bytes(11, "big")  # base-256 for members of 8 GiB and more


def _header(name: str, size: int) -> bytes:
    """The canonical header of a regular file: mode 0644, uid/gid 0, mtime 0, empty owner names."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 100:
        raise MemberError(f"member name {name!r} is longer than 100 characters")
    block = bytearray(BLOCK_SIZE)
    block[0:len(raw_name)] = raw_name
    block[100:108] = b"%07o\0" % _MODE
    block[108:116] = b"%07o\0" % 0
    block[116:124] = b"%07o\0" % 0
    block[124:136] = _size_bytes(size)
    block[136:148] = b"%011o\0" % 0
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[329:337] = b"%07o\0" % 0
    block[337:345] = b"%07o\0" % 0
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


class _Writer:
    __slots__ = ("_out", "count")

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        _write_all(self._out, data)
        self.count += len(data)

    def member(self, name: str, data: bytes) -> None:
        self.write(_header(name, len(data)))
        self.write(bytes(data))
        self.padding(len(data))

    def padding(self, size: int) -> None:
        self.write(bytes(-size % BLOCK_SIZE))

    def end(self) -> None:
        self.write(bytes(2 * BLOCK_SIZE))


def _copy_stream(writer: _Writer, entry: FileEntry, src: IO[bytes]) -> None:
    writer.write(_header(entry.member_name, entry.length))
    digest = hashlib.sha256()
    remaining = entry.length
    while remaining:
        chunk = src.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise SizeError(f"{entry.path}: the stream ended {remaining} bytes short of the declared {entry.length}")
        if len(chunk) > remaining:
            raise FormatError(f"{entry.path}: the input stream returned more bytes than requested")
        digest.update(chunk)
        writer.write(bytes(chunk))
        remaining -= len(chunk)
    if src.read(1):
        raise SizeError(f"{entry.path}: the stream holds more than the declared {entry.length} bytes")
    if digest.hexdigest() != entry.sha256:
        raise DigestError(f"{entry.path}: SHA-256 {digest.hexdigest()} differs from the manifest's {entry.sha256}")
    writer.padding(entry.length)


def write_bundle(out: BinaryIO, manifest_bytes: bytes, signatures: Sequence[Mapping[str, Any]],
                 files: Sequence[tuple[str, BinaryIO | bytes]]) -> int:
    """Write a bundle to ``out`` and return the number of bytes written. Same inputs, same bytes.

    ``manifest_bytes`` must be a valid canonical manifest; ``signatures`` are ``{"keyid", "sig"}`` entries (checked
    for shape only; may be empty, see :func:`add_signatures`); ``files`` are ``(path, bytes or binary stream)`` in
    manifest order, checked against the manifest's lengths and SHA-256 while written (streams in bounded chunks).
    Raises a :class:`BundleError` for any disagreement; ``out`` then holds a partial bundle to discard.
    """
    manifest = Manifest.from_bytes(manifest_bytes)
    sig_bytes = canonical_json({"signatures": parse_signature_list([dict(s) for s in signatures])})
    if len(sig_bytes) > MAX_SIGNATURES_BYTES:
        raise SizeError(f"{SIGNATURES_NAME} would be {len(sig_bytes)} bytes; at most {MAX_SIGNATURES_BYTES}")
    paths = [path for path, _ in files]
    declared = [f.path for f in manifest.files]
    if paths != declared:
        raise MemberError(f"files must be exactly the manifest's files in manifest order: {declared}, got {paths}")
    for (path, data), entry in zip(files, manifest.files, strict=True):
        if isinstance(data, bytes | bytearray | memoryview):
            if len(data) != entry.length:
                raise SizeError(f"{path}: {len(data)} bytes but the manifest declares {entry.length}")
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise DigestError(f"{path}: SHA-256 differs from the manifest's {entry.sha256}")
    writer = _Writer(out)
    writer.member(MANIFEST_NAME, bytes(manifest_bytes))
    writer.member(SIGNATURES_NAME, sig_bytes)
    for (_path, data), entry in zip(files, manifest.files, strict=True):
        if isinstance(data, bytes | bytearray | memoryview):
            writer.member(entry.member_name, bytes(data))
        else:
            _copy_stream(writer, entry, data)
    writer.end()
    return writer.count


def add_signatures(bundle: BinaryIO, out: BinaryIO, signers: Sequence[SigningKey], *,
                   chunk_size: int = 1 << 20) -> None:
    """Copy ``bundle`` to ``out`` with a signature by each of ``signers`` added (k-of-n signing, one signer at a time).

    Existing signatures are kept; there is one entry per key id (a signer's fresh signature replaces an older entry
    of the same key; Ed25519 signatures are deterministic anyway) and entries are sorted by key id, so the result
    does not depend on the order in which signers took part. The payload is checked (names, sizes, SHA-256) while
    copied, so a damaged bundle is not signed. No trust check: use :func:`verify_bundle` for that.
    """
    reader = _Reader(bundle)
    manifest_bytes, doc, existing = _read_head(reader)
    manifest = Manifest.from_dict(doc)
    merged: dict[str, dict[str, str]] = {}
    for entry in existing:
        merged.setdefault(entry["keyid"], entry)
    message = MANIFEST_PREFIX + manifest_bytes
    for signer in signers:
        merged[signer.public.keyid] = {"keyid": signer.public.keyid, "sig": signer.sign(message)}
    sig_bytes = canonical_json({"signatures": [merged[k] for k in sorted(merged)]})
    if len(sig_bytes) > MAX_SIGNATURES_BYTES:
        raise SizeError(f"{SIGNATURES_NAME} would be {len(sig_bytes)} bytes; at most {MAX_SIGNATURES_BYTES}")
    writer = _Writer(out)
    writer.member(MANIFEST_NAME, manifest_bytes)
    writer.member(SIGNATURES_NAME, sig_bytes)

    def open_file(entry: FileEntry) -> _Write:
        writer.write(_header(entry.member_name, entry.length))
        return writer.write

    def close_file(entry: FileEntry) -> None:
        writer.padding(entry.length)

    _stream_payloads(reader, manifest, chunk_size, open_file, close_file)
    _expect_end(reader)
    writer.end()
