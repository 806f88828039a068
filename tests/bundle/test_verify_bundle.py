"""Verifying bundle files: every pure-logic row of THREATS.md "Signed bundles" that concerns the archive.

Arbitrary installation, key compromise below threshold, indefinite freeze, mix-and-match, endless data, path tricks
and bombs. Hostile archives are built by hand (tests/bundle/helpers.py) with correct tar checksums, so each rejection
proves the rule under test. Where the threat is "before any write", the recording sink proves it was never called.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
import tracemalloc
from collections.abc import Iterator

import pytest

from agent.bundle import (
    MANIFEST_PREFIX,
    ORDER_PREFIX,
    BundleError,
    DigestError,
    ExpiredError,
    ExtraMemberError,
    FileEntry,
    FormatError,
    IncompatibleError,
    MemberError,
    MissingMemberError,
    SignatureError,
    SizeError,
    add_signatures,
    canonical_json,
    read_manifest,
    trusted_now,
    verify_bundle,
    write_bundle,
)
from agent.drift import NumericHistogram
from tests.bundle.helpers import (
    END,
    FAKE_MODEL,
    KEYS,
    NOW,
    YEAR,
    CountingStream,
    Fleet,
    Sink,
    bundle_bytes,
    endless_zeros,
    head,
    pad,
    pax_member,
    profile,
    real_model_bundle,
    rejection,
    sha256,
    signatures,
    small_bundle,
    tar_header,
    tar_member,
    tiny_manifest,
    verify,
    zeros,
)

GIB = 1 << 30


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


# -- the happy path ------------------------------------------------------------------------------------------------

def test_valid_bundle_verifies_and_streams_its_payload_to_the_sink(fleet: Fleet) -> None:
    data = small_bundle(fleet)
    sink = Sink()
    vb = verify(data, fleet.root(), sink=sink)
    assert sink.calls == ["model.onnx"] and sink.data("model.onnx") == FAKE_MODEL
    manifest_bytes, sigs = read_manifest(io.BytesIO(data))
    assert vb.manifest_bytes == manifest_bytes and vb.digest == sha256(manifest_bytes)
    assert vb.length == len(data)
    assert sigs == signatures(manifest_bytes, fleet.release_keys)
    assert vb.manifest.to_dict() == tiny_manifest()


def test_real_demo_model_bundle_verifies_with_schema_baseline_and_health(fleet: Fleet) -> None:
    data, model_bytes, samples = real_model_bundle(fleet, version=3)
    sink = Sink()
    vb = verify(data, fleet.root(), sink=sink, profile_name="raspberry-pi-4")
    m = vb.manifest
    assert (m.model, m.version, m.runtime, m.model_file) == ("cancer-mlp", 3, "onnx", "model.onnx")
    assert sink.data("model.onnx") == model_bytes and m.model_entry.sha256 == sha256(model_bytes)
    assert m.schema.version == 3 and m.schema.quantization == "int8" and len(m.schema.inputs[0].features) == 30
    baseline = m.drift_baseline()
    # canonical JSON sorted the features by name; the schema's order (the add_rows column order) is restored
    assert list(baseline.names) == [f.name for f in m.schema.inputs[0].features]
    assert all(isinstance(f, NumericHistogram) and f.n == len(samples["inputs"]["features"])
               for f in baseline.values())
    assert len(m.health.inputs["features"]) == 4 and m.health.top1_must_match
    assert vb.length == len(data)


def test_write_bundle_is_deterministic_and_plain_ustar() -> None:
    manifest = tiny_manifest(files=[("model.onnx", FAKE_MODEL), ("labels.txt", b"malignant\nbenign\n")])
    files = [("model.onnx", FAKE_MODEL), ("labels.txt", b"malignant\nbenign\n")]
    first = bundle_bytes(manifest, files, KEYS[:1])
    assert bundle_bytes(manifest, files, KEYS[:1]) == first
    manifest_bytes = canonical_json(manifest)
    streamed = io.BytesIO()
    write_bundle(streamed, manifest_bytes, signatures(manifest_bytes, KEYS[:1]),
                 [(path, io.BytesIO(content)) for path, content in files])
    assert streamed.getvalue() == first
    # Any tar reader sees exactly the documented members (listing only; nothing is ever extracted).
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "signatures.json", "payload/model.onnx", "payload/labels.txt"]
    assert all(i.isreg() and i.mode == 0o644 and i.mtime == 0 and i.uid == 0 and i.gid == 0 for i in infos)
    assert first.endswith(END) and len(first) % 512 == 0


def test_write_bundle_refuses_files_that_disagree_with_the_manifest() -> None:
    manifest_bytes = canonical_json(tiny_manifest())
    sigs = signatures(manifest_bytes, KEYS[:1])
    for files, error in (
        ([("model.onnx", FAKE_MODEL[:-1] + b"X")], DigestError),
        ([("model.onnx", FAKE_MODEL + b"X")], SizeError),
        ([("model.onnx", io.BytesIO(FAKE_MODEL + b"X"))], SizeError),
        ([("model.onnx", io.BytesIO(FAKE_MODEL[:-1]))], SizeError),
        ([("model.onnx", io.BytesIO(FAKE_MODEL[:-1] + b"X"))], DigestError),
        ([("other.onnx", FAKE_MODEL)], MemberError),
        ([], MemberError),
    ):
        with pytest.raises(error):
            write_bundle(io.BytesIO(), manifest_bytes, sigs, files)
    with pytest.raises(FormatError):
        write_bundle(io.BytesIO(), manifest_bytes + b" ", sigs, [("model.onnx", FAKE_MODEL)])
    with pytest.raises(FormatError):
        write_bundle(io.BytesIO(), manifest_bytes, [{"keyid": "x", "sig": "y"}], [("model.onnx", FAKE_MODEL)])


def test_add_signatures_k_of_n_reaches_threshold_only_with_enough_distinct_signers() -> None:
    fleet = Fleet(release_keys=KEYS[:3], thresholds={"root": 1, "release": 2, "orders": 1})
    root = fleet.root()
    unsigned = bundle_bytes(tiny_manifest(), None, [])
    with pytest.raises(SignatureError):
        verify(unsigned, root)
    one = io.BytesIO()
    add_signatures(io.BytesIO(unsigned), one, [KEYS[0]])
    with pytest.raises(SignatureError, match="found 1"):
        verify(one.getvalue(), root)
    again = io.BytesIO()
    add_signatures(io.BytesIO(one.getvalue()), again, [KEYS[0]])  # the same signer twice: still one signature
    assert len(read_manifest(io.BytesIO(again.getvalue()))[1]) == 1
    two = io.BytesIO()
    add_signatures(io.BytesIO(one.getvalue()), two, [KEYS[1]])
    vb = verify(two.getvalue(), root)
    assert vb.length == len(two.getvalue())
    other_order = io.BytesIO()
    tmp = io.BytesIO()
    add_signatures(io.BytesIO(unsigned), tmp, [KEYS[1]])
    add_signatures(io.BytesIO(tmp.getvalue()), other_order, [KEYS[0]])
    assert other_order.getvalue() == two.getvalue()  # signing order does not matter


def test_add_signatures_refuses_to_sign_a_damaged_payload(fleet: Fleet) -> None:
    data = bytearray(small_bundle(fleet))
    data[data.index(FAKE_MODEL)] ^= 0xFF
    with pytest.raises(DigestError):
        add_signatures(io.BytesIO(bytes(data)), io.BytesIO(), [KEYS[0]])


# -- arbitrary installation ----------------------------------------------------------------------------------------

def test_unsigned_bundle_rejected(fleet: Fleet) -> None:
    sink = Sink()
    exc = rejection(bundle_bytes(tiny_manifest(), None, []), fleet.root(), sink=sink)
    assert isinstance(exc, SignatureError) and exc.reason == "signature"
    assert sink.calls == []


def test_bundle_signed_by_unknown_key_rejected(fleet: Fleet) -> None:
    sink = Sink()
    exc = rejection(bundle_bytes(tiny_manifest(), None, [KEYS[9]]), fleet.root(), sink=sink)
    assert isinstance(exc, SignatureError) and sink.calls == []


def test_valid_signature_over_other_bytes_rejected(fleet: Fleet) -> None:
    genuine = canonical_json(tiny_manifest(version=1))
    forged = canonical_json(tiny_manifest(version=2))
    sigs = canonical_json({"signatures": signatures(genuine, fleet.release_keys)})
    data = (tar_member("manifest.json", forged) + tar_member("signatures.json", sigs)
            + tar_member("payload/model.onnx", FAKE_MODEL) + END)
    assert isinstance(rejection(data, fleet.root()), SignatureError)


def test_signature_made_for_another_document_kind_rejected(fleet: Fleet) -> None:
    manifest_bytes = canonical_json(tiny_manifest())
    k = fleet.release_keys[0]
    sigs = canonical_json({"signatures": [{"keyid": k.public.keyid, "sig": k.sign(ORDER_PREFIX + manifest_bytes)}]})
    data = (tar_member("manifest.json", manifest_bytes) + tar_member("signatures.json", sigs)
            + tar_member("payload/model.onnx", FAKE_MODEL) + END)
    assert isinstance(rejection(data, fleet.root()), SignatureError)
    k.public.verify(MANIFEST_PREFIX + manifest_bytes, k.sign(MANIFEST_PREFIX + manifest_bytes))


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_one_flipped_byte_anywhere_rejected(fleet: Fleet, mask: int) -> None:
    """Every byte offset of a complete small bundle, flipped, is refused: headers, JSON, signatures, payload,
    padding and the end-of-archive blocks are all covered by a check."""
    data = small_bundle(fleet)
    root = fleet.root()
    accepted = []
    for offset in range(len(data)):
        mutated = bytearray(data)
        mutated[offset] ^= mask
        try:
            verify(bytes(mutated), root)
        except BundleError:
            continue
        accepted.append(offset)
    assert accepted == []


# -- indefinite freeze ---------------------------------------------------------------------------------------------

def test_expired_manifest_rejected_as_stale(fleet: Fleet) -> None:
    data = small_bundle(fleet, created_at=NOW - 2 * YEAR, expires_at=NOW - YEAR)
    sink = Sink()
    exc = rejection(data, fleet.root(), sink=sink)
    assert isinstance(exc, ExpiredError) and exc.reason == "stale" and sink.calls == []
    verify(data, fleet.root(), now=NOW - 2 * YEAR + 1)  # it was fine while it was current


def test_device_clock_at_1970_still_judges_expiry_by_trusted_time(fleet: Fleet) -> None:
    data = small_bundle(fleet, created_at=NOW - 2 * YEAR, expires_at=NOW - YEAR)
    now = trusted_now(0.0, NOW)  # booted with the clock at 1970, persisted trusted time says NOW
    assert now == NOW
    assert isinstance(rejection(data, fleet.root(), now=now), ExpiredError)


# -- mix-and-match -------------------------------------------------------------------------------------------------

def test_model_file_from_v8_inside_manifest_v9_rejected(fleet: Fleet) -> None:
    v8_model = bytes(range(100))
    v9_model = bytes(reversed(range(100)))  # same length, other bytes
    head_bytes, _ = head(fleet, tiny_manifest(version=9, files=[("model.onnx", v9_model)]))
    data = head_bytes + tar_member("payload/model.onnx", v8_model) + END
    sink = Sink()
    exc = rejection(data, fleet.root(), sink=sink, chunk_size=16)
    assert isinstance(exc, DigestError) and exc.reason == "digest"
    # the sink never held the complete wrong file: its last chunk is withheld until the digest matches
    assert sink.calls == ["model.onnx"] and len(sink.data("model.onnx")) < len(v8_model)


def test_model_file_of_another_length_rejected_before_the_sink_is_called(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet, tiny_manifest(version=9, files=[("model.onnx", b"v9" * 50)]))
    data = head_bytes + tar_member("payload/model.onnx", b"v8" * 40) + END
    sink = Sink()
    assert isinstance(rejection(data, fleet.root(), sink=sink), SizeError)
    assert sink.calls == []


def test_extra_member_after_the_payload_rejected(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    data = head_bytes + tar_member("payload/model.onnx", FAKE_MODEL) + tar_member("payload/extra.bin", b"x") + END
    exc = rejection(data, fleet.root())
    assert isinstance(exc, ExtraMemberError) and exc.reason == "bad_member" and "extra.bin" in str(exc)


def test_undeclared_member_in_place_of_the_payload_rejected_before_any_write(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    data = head_bytes + tar_member("payload/evil.onnx", FAKE_MODEL) + tar_member("payload/model.onnx", FAKE_MODEL)
    sink = Sink()
    assert isinstance(rejection(data + END, fleet.root(), sink=sink), ExtraMemberError)
    assert sink.calls == []


def test_missing_member_rejected(fleet: Fleet) -> None:
    files = [("model.onnx", FAKE_MODEL), ("labels.txt", b"a\nb\n")]
    head_bytes, _ = head(fleet, tiny_manifest(files=files))
    sink = Sink()
    exc = rejection(head_bytes + tar_member("payload/model.onnx", FAKE_MODEL) + END, fleet.root(), sink=sink)
    assert isinstance(exc, MissingMemberError) and "labels.txt" in str(exc)
    swapped = head_bytes + tar_member("payload/labels.txt", b"a\nb\n") + tar_member("payload/model.onnx", FAKE_MODEL)
    sink = Sink()
    assert isinstance(rejection(swapped + END, fleet.root(), sink=sink), MissingMemberError)
    assert sink.calls == []


@pytest.mark.parametrize("members", [
    [],
    [("signatures.json", b'{"signatures":[]}')],
    [("payload/model.onnx", FAKE_MODEL)],
    [("manifest.json", None)],
    [("manifest.json", None), ("manifest.json", None)],
    [("manifest.json", None), ("payload/model.onnx", FAKE_MODEL)],
], ids=["empty", "no-manifest", "payload-first", "no-signatures", "manifest-twice", "signatures-missing"])
def test_missing_manifest_or_signatures_member_rejected(fleet: Fleet, members: list[tuple[str, bytes | None]]) -> None:
    manifest_bytes = canonical_json(tiny_manifest())
    data = b"".join(tar_member(name, manifest_bytes if body is None else body) for name, body in members) + END
    sink = Sink()
    assert isinstance(rejection(data, fleet.root(), sink=sink), MemberError)
    assert sink.calls == []


# -- endless data --------------------------------------------------------------------------------------------------

def test_member_header_one_byte_longer_than_declared_rejected_before_reading_it(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    lie = tar_header("payload/model.onnx", len(FAKE_MODEL) + 1) + pad(FAKE_MODEL + b"!")
    stream = CountingStream([head_bytes, lie, END])
    sink = Sink()
    with pytest.raises(SizeError, match="declares"):
        verify_bundle(stream, fleet.root(), now=NOW, sink=sink)  # type: ignore[arg-type]
    assert sink.calls == [] and stream.bytes_read == len(head_bytes) + 512


def test_gibibyte_appended_after_the_bundle_is_never_read(fleet: Fleet) -> None:
    data = small_bundle(fleet)
    stream = CountingStream(itertools.chain([data], zeros(GIB)))
    vb = verify_bundle(stream, fleet.root(), now=NOW)  # type: ignore[arg-type]
    assert vb.length == len(data) and stream.bytes_read == len(data)


def test_payload_header_claiming_a_gibibyte_of_endless_zeros_aborts_after_the_header(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    chunk = 1 << 20
    stream = CountingStream(itertools.chain([head_bytes, tar_header("payload/model.onnx", GIB)], endless_zeros()))
    with pytest.raises(SizeError):
        verify_bundle(stream, fleet.root(), now=NOW, chunk_size=chunk)  # type: ignore[arg-type]
    assert stream.bytes_read <= len(head_bytes) + 512 + chunk


def test_signed_gibibyte_payload_followed_by_endless_zeros_reads_at_most_cap_plus_one_chunk(fleet: Fleet) -> None:
    """Even a correctly signed 1 GiB file is read only up to its signed length; a wrong digest aborts there."""
    chunk = 1 << 20
    manifest = tiny_manifest()
    manifest["files"] = [FileEntry("model.onnx", GIB, "ab" * 32).to_dict()]
    head_bytes, _ = head(fleet, manifest)
    stream = CountingStream(itertools.chain([head_bytes, tar_header("payload/model.onnx", GIB)], endless_zeros()))
    with pytest.raises(DigestError):
        verify_bundle(stream, fleet.root(), now=NOW, chunk_size=chunk)  # type: ignore[arg-type]
    assert stream.bytes_read <= len(head_bytes) + 512 + GIB + chunk
    assert stream.largest_read <= chunk


def test_manifest_header_claiming_a_gibibyte_rejected_before_reading_it(fleet: Fleet) -> None:
    stream = CountingStream(itertools.chain([tar_header("manifest.json", GIB)], endless_zeros()))
    with pytest.raises(SizeError, match="at most"):
        verify_bundle(stream, fleet.root(), now=NOW)  # type: ignore[arg-type]
    assert stream.bytes_read == 512


def test_manifest_over_its_cap_rejected(fleet: Fleet) -> None:
    big = tiny_manifest(metadata={"padding": "x" * (1 << 20)})
    data = tar_member("manifest.json", canonical_json(big)) + tar_member("signatures.json", b"{}") + END
    stream = CountingStream([data])
    with pytest.raises(SizeError):
        verify_bundle(stream, fleet.root(), now=NOW)  # type: ignore[arg-type]
    assert stream.bytes_read == 512


def test_signatures_over_their_cap_rejected(fleet: Fleet) -> None:
    manifest_bytes = canonical_json(tiny_manifest())
    many = signatures(manifest_bytes, fleet.release_keys) * 400
    data = (tar_member("manifest.json", manifest_bytes)
            + tar_member("signatures.json", canonical_json({"signatures": many})) + END)
    assert isinstance(rejection(data, fleet.root()), SizeError)


def test_bundle_shorter_than_declared_rejected_at_every_cut(fleet: Fleet) -> None:
    data = small_bundle(fleet)
    for cut in [*range(0, len(data), 97), len(data) - 512, len(data) - 1]:
        exc = rejection(data[:cut], fleet.root())
        assert isinstance(exc, SizeError), (cut, exc)
        assert "truncated" in str(exc)


# -- path tricks (CPython Lib/test/test_tarfile.py::TestExtractionFilters, recreated by hand) --------------------

LONG = "payload/" + "a" * 292  # 300 characters
PATH_TRICKS: dict[str, bytes] = {
    "absolute": tar_member("/etc/passwd", FAKE_MODEL),
    "absolute-payload": tar_member("/payload/model.onnx", FAKE_MODEL),
    "sly-relative0": tar_member("../moo", FAKE_MODEL),
    "sly-relative2": tar_member("payload/../../moo", FAKE_MODEL),
    "dotdot-in-the-middle": tar_member("payload/../model.onnx", FAKE_MODEL),
    "absolute-symlink": tar_header("payload/model.onnx", 0, typeflag=b"2", linkname=b"/etc/passwd"),
    "parent-symlink": tar_header("payload/model.onnx", 0, typeflag=b"2", linkname=b"../../../etc"),
    "absolute-hardlink": tar_header("payload/model.onnx", 0, typeflag=b"1", linkname=b"/etc/passwd"),
    "hardlink-to-member": tar_header("payload/model.onnx", 0, typeflag=b"1", linkname=b"manifest.json"),
    "character-device": tar_header("payload/model.onnx", 0, typeflag=b"3"),
    "block-device": tar_header("payload/model.onnx", 0, typeflag=b"4"),
    "directory": tar_header("payload/", 0, typeflag=b"5", mode=0o755),
    "fifo": tar_header("payload/model.onnx", 0, typeflag=b"6"),
    "contiguous-file": tar_member("payload/model.onnx", FAKE_MODEL, typeflag=b"7"),
    "pre-posix-regular": tar_member("payload/model.onnx", FAKE_MODEL, typeflag=b"\0"),
    "nul-in-name": tar_member(b"payload/model.onnx\0../../../etc/passwd", FAKE_MODEL),
    "300-char-name-pax": pax_member({"path": LONG}) + tar_member("payload/model.onnx", FAKE_MODEL),
    "300-char-name-gnu": tar_member("././@LongLink", LONG.encode() + b"\0", typeflag=b"L")
    + tar_member("payload/model.onnx", FAKE_MODEL),
    "long-link-gnu": tar_member("././@LongLink", b"/" + b"x" * 300, typeflag=b"K")
    + tar_header("payload/model.onnx", 0, typeflag=b"2"),
    "300-char-name-ustar-prefix": tar_member("a" * 100, FAKE_MODEL, prefix=b"payload/" + b"b" * 147),
    "pax-size-override": pax_member({"size": "99999999999"}) + tar_member("payload/model.onnx", FAKE_MODEL),
    "pax-global-header": pax_member({"comment": "x"}, typeflag=b"g") + tar_member("payload/model.onnx", FAKE_MODEL),
    "setuid-mode": tar_member("payload/model.onnx", FAKE_MODEL, mode=0o4755),
    "executable-mode": tar_member("payload/model.onnx", FAKE_MODEL, mode=0o755),
    "non-ascii-name": tar_member("payload/m\u00f6del.onnx".encode(), FAKE_MODEL),
    "backslashes": tar_member("payload\\..\\..\\evil", FAKE_MODEL),
    "100-char-name-without-nul": tar_member("payload/" + "a" * 92, FAKE_MODEL),
    "trailing-slash": tar_member("payload/model.onnx/", FAKE_MODEL),
    "duplicate-manifest": tar_member("manifest.json", b"{}"),
    "duplicate-signatures": tar_member("signatures.json", b'{"signatures":[]}'),
}


@pytest.mark.parametrize("member", PATH_TRICKS.values(), ids=PATH_TRICKS.keys())
def test_path_trick_in_place_of_the_payload_rejected_before_any_write(fleet: Fleet, member: bytes) -> None:
    head_bytes, _ = head(fleet)
    sink = Sink()
    exc = rejection(head_bytes + member + END, fleet.root(), sink=sink)
    assert isinstance(exc, MemberError) and exc.reason == "bad_member", exc
    assert sink.calls == []


@pytest.mark.parametrize("member", PATH_TRICKS.values(), ids=PATH_TRICKS.keys())
def test_path_trick_as_first_member_rejected(fleet: Fleet, member: bytes) -> None:
    head_bytes, _ = head(fleet)
    sink = Sink()
    assert isinstance(rejection(member + head_bytes + END, fleet.root(), sink=sink), MemberError)
    assert sink.calls == []


def test_duplicate_payload_name_rejected(fleet: Fleet) -> None:
    files = [("model.onnx", FAKE_MODEL), ("labels.txt", FAKE_MODEL)]
    head_bytes, _ = head(fleet, tiny_manifest(files=files))
    data = head_bytes + tar_member("payload/model.onnx", FAKE_MODEL) + tar_member("payload/model.onnx", FAKE_MODEL)
    sink = Sink()
    exc = rejection(data + END, fleet.root(), sink=sink)
    assert isinstance(exc, ExtraMemberError) and "twice" in str(exc)
    assert sink.calls == ["model.onnx"]  # the first, legitimate copy only


def test_gnu_magic_and_bad_checksum_are_not_ustar(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    gnu = tar_member("payload/model.onnx", FAKE_MODEL, magic=b"ustar  \0")
    assert isinstance(rejection(head_bytes + gnu + END, fleet.root()), FormatError)
    broken = bytearray(tar_member("payload/model.onnx", FAKE_MODEL))
    broken[148:156] = b"000000\0 "
    assert isinstance(rejection(head_bytes + bytes(broken) + END, fleet.root()), FormatError)


def test_base256_size_is_parsed_and_negative_size_rejected(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    size = b"\x80" + len(FAKE_MODEL).to_bytes(11, "big")
    ok = tar_header("payload/model.onnx", 0, size_field=size) + pad(FAKE_MODEL)
    verify(head_bytes + ok + END, fleet.root())
    negative = tar_header("payload/model.onnx", 0, size_field=b"\xff" * 12) + pad(FAKE_MODEL)
    assert isinstance(rejection(head_bytes + negative + END, fleet.root()), FormatError)


def test_non_zero_padding_and_garbage_end_blocks_rejected(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    member = bytearray(tar_member("payload/model.onnx", FAKE_MODEL))
    member[-1] = 1
    assert isinstance(rejection(head_bytes + bytes(member) + END, fleet.root()), FormatError)
    second_block_dirty = bytes(512) + b"\x01" + bytes(511)
    good = head_bytes + tar_member("payload/model.onnx", FAKE_MODEL)
    assert isinstance(rejection(good + second_block_dirty, fleet.root()), FormatError)


# -- bombs ---------------------------------------------------------------------------------------------------------

def test_member_expanding_past_its_declared_size_rejected(fleet: Fleet) -> None:
    head_bytes, _ = head(fleet)
    huge = b"\x80" + (1 << 40).to_bytes(11, "big")  # 1 TiB in base-256
    stream = CountingStream(itertools.chain([head_bytes, tar_header("payload/model.onnx", 0, size_field=huge)],
                                            endless_zeros()))
    sink = Sink()
    with pytest.raises(SizeError):
        verify_bundle(stream, fleet.root(), now=NOW, sink=sink)  # type: ignore[arg-type]
    assert sink.calls == [] and stream.bytes_read == len(head_bytes) + 512


def _many_members(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield tar_member(f"payload/m{i}.bin", b"x")


def test_hundred_thousand_members_only_the_first_unexpected_one_is_read(fleet: Fleet) -> None:
    data = small_bundle(fleet)
    body = data[:-1024]
    stream = CountingStream(itertools.chain([body], _many_members(100_000), [END]))
    with pytest.raises(ExtraMemberError):
        verify_bundle(stream, fleet.root(), now=NOW)  # type: ignore[arg-type]
    assert stream.bytes_read == len(body) + 512
    head_bytes, _ = head(fleet)
    stream = CountingStream(itertools.chain([head_bytes], _many_members(100_000), [END]))
    with pytest.raises(ExtraMemberError):
        verify_bundle(stream, fleet.root(), now=NOW)  # type: ignore[arg-type]
    assert stream.bytes_read == len(head_bytes) + 512


def test_nested_archive_as_undeclared_member_rejected(fleet: Fleet) -> None:
    inner = small_bundle(fleet)
    head_bytes, _ = head(fleet)
    sink = Sink()
    for data in (head_bytes + tar_member("payload/inner.tar", inner) + tar_member("payload/model.onnx", FAKE_MODEL),
                 head_bytes + tar_member("payload/model.onnx", FAKE_MODEL) + tar_member("payload/inner.tar", inner)):
        assert isinstance(rejection(data + END, fleet.root(), sink=sink), ExtraMemberError)
    assert "inner.tar" not in sink.calls


class _HashingSink:
    """Keeps nothing but a running hash, so memory measured is the verifier's own."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.calls = 0

    def __call__(self, path: str) -> _HashingSink:
        self.calls += 1
        return self

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)


def test_memory_stays_bounded_while_streaming_a_large_payload(fleet: Fleet) -> None:
    size, piece = 32 << 20, 1 << 20

    def payload() -> Iterator[bytes]:
        for i in range(size // piece):
            yield bytes([i % 251]) * piece

    digest = hashlib.sha256()
    for p in payload():
        digest.update(p)
    manifest = tiny_manifest()
    manifest["files"] = [FileEntry("model.onnx", size, digest.hexdigest()).to_dict()]
    head_bytes, _ = head(fleet, manifest)
    stream = CountingStream(itertools.chain([head_bytes, tar_header("payload/model.onnx", size)], payload(), [END]))
    sink = _HashingSink()
    root = fleet.root()
    tracemalloc.start()
    try:
        vb = verify_bundle(stream, root, now=NOW, sink=sink)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vb.manifest.files[0].length == size and sink.digest.hexdigest() == digest.hexdigest()
    assert peak < 8 * piece, f"peak {peak / piece:.1f} MiB while streaming 32 MiB"


# -- firmware profile ----------------------------------------------------------------------------------------------

def test_bundle_for_another_firmware_profile_rejected(fleet: Fleet) -> None:
    data = small_bundle(fleet, profiles=("coral-dev-board",))
    sink = Sink()
    exc = rejection(data, fleet.root(), sink=sink, profile_name="raspberry-pi-4")
    assert isinstance(exc, IncompatibleError) and exc.reason == "incompatible" and sink.calls == []
    verify(data, fleet.root(), profile_name="coral-dev-board")


def test_model_over_the_profile_size_limit_rejected_before_download_bytes_are_read(fleet: Fleet) -> None:
    manifest = tiny_manifest(profiles=("coral-dev-board",))
    manifest["files"] = [FileEntry("model.onnx", 33 << 20, "00" * 32).to_dict()]
    head_bytes, _ = head(fleet, manifest)
    stream = CountingStream(itertools.chain([head_bytes], endless_zeros()))
    with pytest.raises(IncompatibleError, match="at most"):
        verify_bundle(stream, fleet.root(), now=NOW, profile=profile("coral-dev-board"))  # type: ignore[arg-type]
    assert stream.bytes_read == len(head_bytes)
