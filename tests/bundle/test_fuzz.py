"""Parser robustness: property-based fuzzing of every parser in agent.bundle. Only BundleError subclasses escape,
and no mutation of a valid bundle is ever accepted with contents other than the signed ones."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.bundle import (
    ORDER_PREFIX,
    ROOT_PREFIX,
    BundleError,
    Manifest,
    TrustRoot,
    canonical_json,
    read_manifest,
    sign_document,
    strict_loads,
    verify_bundle,
    verify_order,
)
from tests.bundle.helpers import (
    DEVICE,
    END,
    FAKE_MODEL,
    NOW,
    Fleet,
    Sink,
    head,
    order_doc,
    small_bundle,
    tar_header,
    tiny_manifest,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLEET = Fleet()
ROOT = FLEET.root()
BUNDLE = small_bundle(FLEET)
MANIFEST = tiny_manifest()
ORDER = json.loads(order_doc(FLEET))
ROOT_DOC = json.loads(FLEET.root_bytes())

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """Replace one node of ``doc`` with a random JSON value, delete it, or add an unknown key next to it."""
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(_paths(doc)))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
    else:
        parent.append(data.draw(json_values))
    return doc


@FUZZ
@given(st.binary(max_size=2000))
def test_strict_loads_and_manifest_from_arbitrary_bytes_raise_only_bundle_errors(data: bytes) -> None:
    for parse in (strict_loads, Manifest.from_bytes, TrustRoot.from_bytes):
        with contextlib.suppress(BundleError):
            parse(data)


@FUZZ
@given(json_values)
def test_manifest_from_arbitrary_json_raises_only_bundle_errors(value: Any) -> None:
    with contextlib.suppress(BundleError):
        Manifest.from_dict(value)


@FUZZ
@given(st.data())
def test_mutated_manifest_raises_only_bundle_errors(data: st.DataObject) -> None:
    doc = _mutate(MANIFEST, data)
    with contextlib.suppress(BundleError):
        Manifest.from_bytes(canonical_json(doc))


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(BUNDLE) - 1), st.integers(1, 255)), min_size=1,
                max_size=4),
       st.integers(min_value=0, max_value=len(BUNDLE)))
def test_mutated_bundle_is_rejected_or_unchanged(flips: list[tuple[int, int]], cut: int) -> None:
    mutated = bytearray(BUNDLE)
    for offset, mask in flips:
        mutated[offset] ^= mask
    candidate = bytes(mutated[:cut]) if cut < len(BUNDLE) // 2 else bytes(mutated)
    sink = Sink()
    try:
        vb = verify_bundle(io.BytesIO(candidate), ROOT, now=NOW, sink=sink)
    except BundleError:
        return
    # Only a byte-identical bundle may pass (e.g. flips that cancel out).
    assert candidate == BUNDLE and sink.data("model.onnx") == FAKE_MODEL and vb.length == len(BUNDLE)


@FUZZ
@given(st.binary(max_size=600), st.binary(max_size=1200))
def test_random_members_after_a_valid_head_raise_only_bundle_errors(header_tail: bytes, body: bytes) -> None:
    head_bytes, _ = head(FLEET)
    candidates = [
        head_bytes + header_tail + body,
        head_bytes + tar_header("payload/model.onnx", len(body)) + body + END,
        header_tail + body,
    ]
    for data in candidates:
        with contextlib.suppress(BundleError):
            verify_bundle(io.BytesIO(data), ROOT, now=NOW)
        with contextlib.suppress(BundleError):
            read_manifest(io.BytesIO(data))


@FUZZ
@given(json_values)
def test_random_signatures_document_raises_only_bundle_errors(value: Any) -> None:
    from tests.bundle.helpers import tar_member

    manifest_bytes = canonical_json(MANIFEST)
    data = (tar_member("manifest.json", manifest_bytes) + tar_member("signatures.json", canonical_json(value))
            + tar_member("payload/model.onnx", FAKE_MODEL) + END)
    with contextlib.suppress(BundleError):
        verify_bundle(io.BytesIO(data), ROOT, now=NOW)


@FUZZ
@given(st.data())
def test_mutated_order_raises_only_bundle_errors(data: st.DataObject) -> None:
    doc = _mutate(ORDER, data)
    for form in (doc, canonical_json(doc)):
        with contextlib.suppress(BundleError):
            verify_order(form, ROOT, device_id=DEVICE, last_sequence=None, now=NOW)
    # Re-signed, a mutated signed part reaches the field checks: still only BundleErrors.
    signed = doc.get("signed") if isinstance(doc, dict) else None
    if isinstance(signed, dict):
        with contextlib.suppress(BundleError):
            verify_order(sign_document(signed, ORDER_PREFIX, FLEET.orders_keys), ROOT, device_id=DEVICE,
                         last_sequence=None, now=NOW)


@FUZZ
@given(json_values)
def test_arbitrary_order_document_raises_only_bundle_errors(value: Any) -> None:
    for form in (value, {"signed": value, "signatures": []}, canonical_json(value)):
        with contextlib.suppress(BundleError):
            verify_order(form, ROOT, device_id=DEVICE, last_sequence=5, now=NOW)


@FUZZ
@given(st.data())
def test_mutated_root_raises_only_bundle_errors(data: st.DataObject) -> None:
    doc = _mutate(ROOT_DOC, data)
    with contextlib.suppress(BundleError):
        TrustRoot.from_bytes(canonical_json(doc))
    signed = doc.get("signed") if isinstance(doc, dict) else None
    if isinstance(signed, dict):
        resigned = sign_document(signed, ROOT_PREFIX, FLEET.root_keys)
        for attempt in (TrustRoot.from_bytes, ROOT.update):
            with contextlib.suppress(BundleError):
                attempt(resigned)


@FUZZ
@given(st.data())
def test_resigned_mutated_manifest_in_a_bundle_raises_only_bundle_errors(data: st.DataObject) -> None:
    doc = _mutate(MANIFEST, data)
    try:
        manifest_bytes = canonical_json(doc)
    except BundleError:
        assume(False)
        return
    from tests.bundle.helpers import signatures, tar_member

    sigs = canonical_json({"signatures": signatures(manifest_bytes, FLEET.release_keys)})
    bundle = (tar_member("manifest.json", manifest_bytes) + tar_member("signatures.json", sigs)
              + tar_member("payload/model.onnx", FAKE_MODEL) + END)
    with contextlib.suppress(BundleError):
        verify_bundle(io.BytesIO(bundle), ROOT, now=NOW)
