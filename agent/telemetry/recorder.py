"""On-device drift accounting: what the inference thread records, and how it becomes histograms and windows.

Two costs are kept apart:

* **Hot path** (:meth:`DriftRecorder.observe`, the ``LoadedModel.observer``): runs on the request's thread after a
  successful inference and only appends the request's data to a bounded buffer (a ``deque``; appends are atomic,
  no lock): the summarised input and output tensors as ``bytes`` copies when they are small (a one-row request is
  a few hundred bytes), by reference when they are big. No binning. When the buffer is full the request's rows
  are *dropped and counted* (``rows_dropped``) and only its SLIs are recorded, under a small lock.

  Why copies and not references for small tensors: measured on cancer-mlp (11.5 us per call), keeping the
  request's dicts and the runtime's output arrays alive until the worker frees them cost ~1.2 us per request in
  total, copying the bytes ~0.5 us (the late frees of runtime-owned arrays are the expensive part). A copy also
  lets a caller reuse its input array at once.
* **Worker** (:meth:`DriftRecorder.process`): drains the buffer, joins the rows into one matrix and bins all numeric
  columns (inputs and outputs) at once with the drift layout's vectorised :class:`~agent.drift.BatchBinner` (the
  binner :meth:`Summary.add_rows <agent.drift.Summary.add_rows>` uses, kept for the recorder's lifetime instead
  of being rebuilt for every window), then rolls windows (:class:`~agent.telemetry.windows.WindowRoller`).
  :class:`TelemetryHub` runs one worker thread for all models; it wakes when a recorder holds ``flush_entries``
  requests or every ``flush_s`` seconds. Tests call :meth:`TelemetryHub.tick` instead.

What is summarised per model version (feature names are the layout's feature names):

* every input feature of a 2-D input tensor (``[N, F]``, one feature per column, named as in the schema): numeric
  with the bundle baseline's edges when the baseline has the feature, else uniform edges from the schema's
  ``min``/``max`` (16 bins on a binary grid, see :func:`schema_edges`); categorical when the baseline holds the
  feature as categorical counts (values are turned into category names: integral values as ``"3"``);
* per classifier output (``[N, K]`` with ``K`` labels): ``"<output>[<label>]"`` the class probability (edges
  0..1, 20 bins) and ``"<output>.class"`` the predicted class (categorical counts over the labels; rows with a
  non-finite output count as ``missing``);
* per single-value output without labels (``[N]`` or ``[N, 1]``): ``"<output>"`` the regression value.

Bad values never crash the worker: NaN goes to ``nan``, +-inf and out-of-range values to ``underflow`` /
``overflow``, unknown categories to their own name or ``other`` (the layout's counters). Requests rejected by the
schema check reach only :meth:`DriftRecorder.observe_error` (SLIs), never the histograms. Rows that cannot be
binned at all (e.g. values so large the moments overflow) are counted in ``rows_failed``.

Only tensors over 16 KiB are kept by reference: a caller must not modify such a big input array after ``infer``
returned until the worker has binned it (within ``flush_s``); the local API builds a fresh array per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from agent.drift import (
    DEFAULT_MAX_CATEGORIES,
    MAX_CATEGORIES_LIMIT,
    BatchBinner,
    CategoricalCounts,
    DriftLayoutError,
    Edges,
    FeatureSummary,
    NumericHistogram,
    Summary,
)
from agent.model import FeatureSpec, ModelSchema, ServedFlags
from agent.protocol import DriftWindow
from agent.telemetry.slis import WindowSlis
from agent.telemetry.windows import ClosedWindow, OpenWindow, WindowPolicy, WindowRoller

if TYPE_CHECKING:
    from agent.runtime.host import LoadedModel

__all__ = [
    "PROBABILITY_BINS",
    "SCHEMA_BINS",
    "DriftPlan",
    "DriftRecorder",
    "TelemetryHub",
    "build_plan",
    "schema_edges",
]

log = logging.getLogger("edge_agent.telemetry")

SCHEMA_BINS: Final = 16
"""Bins per input feature when the edges come from the schema's ``min``/``max`` (no bundle baseline)."""
PROBABILITY_BINS: Final = 20
"""Bins of a class-probability output over ``[0, 1]``."""
_GRID_FRACTION: Final = 1024
"""Schema edges lie on a binary grid of at most 1/1024 of a bin: short mantissas, so they compress on the wire."""
_OPEN_EDGES: Final = tuple(
    [-(10.0 ** e) for e in range(6, -4, -1)] + [0.0] + [10.0 ** e for e in range(-3, 7)]
)
"""Fixed sign-symmetric decades (-1e6 .. -1e-3, 0, 1e-3 .. 1e6) for a feature without a declared min or max."""
_DEFAULT_CAPACITY: Final = 8192
_DEFAULT_FLUSH_ENTRIES: Final = 4096
_MAX_BATCH: Final = 4096
"""Requests binned together at most (the joined matrix of a batch is at most 4096 x columns x 4-8 bytes)."""

Arrays = Mapping[str, npt.NDArray[Any]]
Entry = tuple[Any, Any, float, ServedFlags | None]
"""Buffered per request: the summarised tensors' data (see ``DriftRecorder.observe``), latency, flags."""
_COPY_LIMIT: Final = 16 * 1024
"""Tensors up to this size are copied to ``bytes`` on the hot path; bigger ones are kept by reference."""


# ------------------------------------------------------------------------------------------------------------------
# Edges and the plan: which columns become which features
# ------------------------------------------------------------------------------------------------------------------


def _grid_uniform(lo: float, hi: float, bins: int) -> Edges | None:
    """``bins`` equal bins covering ``[lo, hi]`` whose edges are multiples of a power of two (``None`` if unsafe).

    The range is widened by less than 2 % of a bin so every edge is ``(a + i*b) * 2**k`` with small integers: such
    float64 values end in zero bytes, which zlib compresses (about 40 % fewer bytes per edge on the wire).
    """
    step = (hi - lo) / bins
    if not (math.isfinite(step) and step > 0.0):
        return None
    g = 2.0 ** math.floor(math.log2(step / _GRID_FRACTION))
    if not (math.isfinite(g) and g > 0.0):
        return None
    a = math.floor(lo / g)
    b = math.ceil(((hi - a * g) / bins) / g)
    if b < 1 or abs(a) + bins * b >= 2**52:
        return None
    values = [(a + i * b) * g for i in range(bins + 1)]
    if not (values[0] <= lo and values[-1] >= hi and all(math.isfinite(v) for v in values)):
        return None
    try:
        return Edges(values)
    except DriftLayoutError:
        return None


def schema_edges(feature: FeatureSpec, bins: int = SCHEMA_BINS) -> Edges:
    """Edges for an input feature of a model without a bundle baseline, from the schema's ``min``/``max``.

    * ``min < max``: ``bins`` uniform bins covering ``[min, max]``, on a binary grid (widened by < 2 % of a bin);
    * ``min == max`` (a constant feature): the single bin ``[v, nextafter(v)]``, as ``Edges.quantiles`` does for a
      constant sample; anything else is underflow/overflow;
    * a missing bound: fixed sign-symmetric decades (``-1e6 .. -1e-3, 0, 1e-3 .. 1e6``) cut at the known bound.
    """
    lo, hi = feature.min, feature.max
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        if lo < hi:
            return _grid_uniform(float(lo), float(hi), bins) or Edges.uniform(lo, hi, bins)
        if lo == hi:
            v = float(lo)
            up = float(np.nextafter(v, np.inf))
            return Edges([v, up] if math.isfinite(up) else [float(np.nextafter(v, -np.inf)), v])
    low = lo if lo is not None and math.isfinite(lo) else None
    high = hi if hi is not None and math.isfinite(hi) else None
    if low is not None and high is not None and low > high:
        low = high = None
    values = [v for v in _OPEN_EDGES if (low is None or v > low) and (high is None or v < high)]
    if low is not None:
        values.insert(0, float(low))
    if high is not None:
        values.append(float(high))
    if len(values) < 2:
        base = float(low if low is not None else high if high is not None else 0.0)
        values = [base, base + max(1.0, abs(base))]
    return Edges(values)


@dataclass(frozen=True, slots=True)
class _Segment:
    """Columns of one tensor that go into the numeric matrix, starting at matrix column ``start``."""

    output: bool
    tensor: str
    width: int
    columns: tuple[int, ...]
    start: int


@dataclass(frozen=True, slots=True)
class _Tensor:
    """A tensor the summary reads: where it comes from and the layout of one row."""

    output: bool
    name: str
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...]
    row_bytes: int


@dataclass(frozen=True, slots=True)
class _CategoricalInput:
    tensor: str
    column: int
    width: int
    name: str


@dataclass(frozen=True, slots=True)
class _ClassOutput:
    tensor: str
    labels: tuple[str, ...]
    name: str


@dataclass(frozen=True, slots=True)
class DriftPlan:
    """Which tensor columns become which features, and the window template (layout order)."""

    template: Summary
    numeric_names: tuple[str, ...]
    """Feature names of the numeric matrix columns, in matrix order."""
    segments: tuple[_Segment, ...]
    categorical_inputs: tuple[_CategoricalInput, ...]
    class_outputs: tuple[_ClassOutput, ...]
    tensors: tuple[_Tensor, ...]
    """The tensors the summary reads (inputs first); the first one's rows are the samples of a request."""
    matrix_dtype: np.dtype[Any]
    """float32 when every numeric column converts to it exactly (float32/16, small ints, bool), else float64."""
    edges_source: str
    """``"baseline"`` (every input feature binned on the bundle baseline's edges), ``"schema"`` (none: edges from
    the schema's min/max) or ``"mixed"``."""
    skipped: tuple[str, ...]
    """Tensors not summarised, with the reason (for the log)."""


def _width(shape: tuple[int, ...]) -> int | None:
    """Columns per row of a batch-first tensor: ``[N, F]`` -> F, ``[N]`` -> 1; ``None`` if not 1-D/2-D."""
    if len(shape) == 1:
        return 1
    if len(shape) == 2 and shape[1] >= 1:
        return shape[1]
    return None


def build_plan(schema: ModelSchema, baseline: Summary | None = None) -> DriftPlan:
    """Work out the features of a model's drift windows from its schema and (optional) bundle baseline."""
    features: list[tuple[str, FeatureSummary]] = []
    names: set[str] = set()
    numeric_names: list[str] = []
    segments: list[_Segment] = []
    categorical: list[_CategoricalInput] = []
    classes: list[_ClassOutput] = []
    skipped: list[str] = []
    from_baseline = from_schema = 0

    def add(name: str, feature: FeatureSummary) -> bool:
        if name in names:
            skipped.append(f"feature {name!r} appears twice; the second one is not summarised")
            return False
        names.add(name)
        features.append((name, feature))
        return True

    for tensor in schema.inputs:
        if not tensor.features:
            continue
        width = _width(tensor.shape)
        if width is None or width != len(tensor.features) or np.dtype(tensor.dtype).kind not in "biuf":
            skipped.append(f"input {tensor.name!r}: only numeric [N, features] inputs are summarised")
            continue
        cols: list[int] = []
        for j, spec in enumerate(tensor.features):
            known = baseline.get(spec.name) if baseline is not None else None
            if isinstance(known, CategoricalCounts):
                if add(spec.name, known.empty_like()):
                    categorical.append(_CategoricalInput(tensor.name, j, width, spec.name))
                    from_baseline += 1
                continue
            if isinstance(known, NumericHistogram):
                feature, from_baseline = known.empty_like(), from_baseline + 1
            else:
                feature, from_schema = NumericHistogram(schema_edges(spec)), from_schema + 1
            if add(spec.name, feature):
                cols.append(j)
                numeric_names.append(spec.name)
        if cols:
            segments.append(_Segment(False, tensor.name, width, tuple(cols), len(numeric_names) - len(cols)))

    for tensor in schema.outputs:
        width = _width(tensor.shape)
        kind = np.dtype(tensor.dtype).kind
        if width is None or kind not in "biuf":
            skipped.append(f"output {tensor.name!r}: only numeric [N] / [N, K] outputs are summarised")
            continue
        cols = []
        if tensor.labels and len(tensor.labels) == width and width >= 2:
            for j, label in enumerate(tensor.labels):
                name = f"{tensor.name}[{label}]"
                known = baseline.get(name) if baseline is not None else None
                edges = (known.edges if isinstance(known, NumericHistogram)
                         else Edges.uniform(0.0, 1.0, PROBABILITY_BINS))
                if add(name, NumericHistogram(edges)):
                    cols.append(j)
                    numeric_names.append(name)
            name = f"{tensor.name}.class"
            known = baseline.get(name) if baseline is not None else None
            if isinstance(known, CategoricalCounts):
                counts = known.empty_like()
            else:
                cap = min(MAX_CATEGORIES_LIMIT, max(DEFAULT_MAX_CATEGORIES, len(set(tensor.labels))))
                counts = CategoricalCounts(tensor.labels, max_categories=cap)
            if add(name, counts):
                classes.append(_ClassOutput(tensor.name, tuple(tensor.labels), name))
        elif not tensor.labels and width == 1:
            name = tensor.name
            known = baseline.get(name) if baseline is not None else None
            edges = known.edges if isinstance(known, NumericHistogram) else Edges(list(_OPEN_EDGES))
            if add(name, NumericHistogram(edges)):
                cols.append(0)
                numeric_names.append(name)
        else:
            skipped.append(f"output {tensor.name!r}: neither a classifier with one label per column nor one value")
        if cols:
            segments.append(_Segment(True, tensor.name, width, tuple(cols), len(numeric_names) - len(cols)))

    if from_schema == 0 and from_baseline > 0:
        source = "baseline"
    elif from_baseline == 0:
        source = "schema"
    else:
        source = "mixed"
    used_in = {s.tensor for s in segments if not s.output} | {c.tensor for c in categorical}
    used_out = {s.tensor for s in segments if s.output} | {c.tensor for c in classes}
    tensors: list[_Tensor] = []
    for output, specs, used in ((False, schema.inputs, used_in), (True, schema.outputs, used_out)):
        for t in specs:
            if t.name in used:
                dtype = np.dtype(t.dtype)
                row_shape = tuple(t.shape[1:])
                tensors.append(_Tensor(output, t.name, dtype, row_shape, dtype.itemsize * math.prod(row_shape)))
    exact32 = all(np.can_cast(t.dtype, np.float32, casting="safe") for t in tensors
                  if any(s.tensor == t.name and s.output == t.output for s in segments))
    matrix_dtype = np.dtype(np.float32 if exact32 else np.float64)
    return DriftPlan(Summary(features), tuple(numeric_names), tuple(segments), tuple(categorical), tuple(classes),
                     tuple(tensors), matrix_dtype, source, tuple(skipped))


# ------------------------------------------------------------------------------------------------------------------
# The recorder of one model version
# ------------------------------------------------------------------------------------------------------------------


def _nbytes(data: bytes | npt.NDArray[Any]) -> int:
    return len(data) if isinstance(data, bytes) else int(data.nbytes)


def _category_names(column: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Numeric column -> object array of category names (``"3"`` for integral values, ``None`` for NaN)."""
    out = np.empty(column.shape[0], dtype=object)
    if column.dtype.kind in "biu":
        out[:] = column.astype(np.int64).astype(str)
        return out
    x = column.astype(np.float64)
    finite = np.isfinite(x)
    integral = finite & (np.floor(x) == x) & (np.abs(x) < 2.0**63)
    out[integral] = x[integral].astype(np.int64).astype(str)
    other = finite & ~integral
    if other.any():
        out[other] = [repr(float(v)) for v in x[other]]
    inf = np.isinf(x)
    out[inf] = np.where(x[inf] > 0, "inf", "-inf")
    out[np.isnan(x)] = None
    return out


def _copy(array: npt.NDArray[Any]) -> bytes | npt.NDArray[Any]:
    return array.tobytes() if array.nbytes <= _COPY_LIMIT else array


def _stack(parts: Sequence[bytes | npt.NDArray[Any]], tensor: _Tensor) -> npt.NDArray[Any]:
    """The rows of one tensor over many requests as one ``(rows, *row_shape)`` array.

    ``parts`` are the bytes the hot path copied (or, for a big request, the array itself): joining them costs a few
    tens of nanoseconds per request, against ~80 ns for ``np.concatenate`` of one-row arrays.
    """
    try:
        buf = b"".join(parts)  # type: ignore[arg-type]  # C-contiguous ndarrays are bytes-like
    except TypeError:  # a non-contiguous array
        buf = b"".join([p if type(p) is bytes else np.ascontiguousarray(p).tobytes() for p in parts])
    if tensor.row_bytes == 0 or len(buf) % tensor.row_bytes:
        raise ValueError(f"{'output' if tensor.output else 'input'} {tensor.name!r}: {len(buf)} bytes are not whole "
                         f"rows of {tensor.row_bytes} bytes")
    return np.frombuffer(buf, dtype=tensor.dtype).reshape(-1, *tensor.row_shape)


class _Batch:
    """Requests drained from the buffer, transposed and joined once (shared by the windows they fill)."""

    __slots__ = ("entries", "flags_nf", "flags_oor", "latency_us", "matrix", "offsets", "outputs", "tensors")

    def __init__(self, plan: DriftPlan, entries: Sequence[Entry], *, fast: bool) -> None:
        self.entries = entries
        first, second, lats, flags = zip(*entries, strict=True)
        n = len(entries)
        self.latency_us = np.fromiter(lats, dtype=np.float64, count=n) * 1e6
        self.flags_oor: npt.NDArray[np.bool_] | None = None
        self.flags_nf: npt.NDArray[np.bool_] | None = None
        if flags.count(None) != n:
            self.flags_oor = np.fromiter((f is not None and bool(f.out_of_range) for f in flags), bool, count=n)
            self.flags_nf = np.fromiter((f is not None and bool(f.non_finite) for f in flags), bool, count=n)
        self.tensors: dict[str, npt.NDArray[Any]] = {}
        self.outputs: dict[str, npt.NDArray[Any]] = {}
        per_tensor: list[Sequence[Any]] = (
            [first, second] if fast else [list(col) for col in zip(*first, strict=True)])
        for tensor, parts in zip(plan.tensors, per_tensor, strict=True):
            (self.outputs if tensor.output else self.tensors)[tensor.name] = _stack(parts, tensor)
        if not plan.tensors:
            self.offsets = np.zeros(n + 1, dtype=np.int64)  # nothing summarised: no samples
            rows = 0
        else:
            t0 = plan.tensors[0]
            rows = int((self.outputs if t0.output else self.tensors)[t0.name].shape[0])
            if rows == n:
                self.offsets = np.arange(n + 1, dtype=np.int64)
            else:
                self.offsets = np.zeros(n + 1, dtype=np.int64)
                np.cumsum([_nbytes(p) // t0.row_bytes for p in per_tensor[0]], out=self.offsets[1:])
        self.matrix = np.empty((rows, len(plan.numeric_names)), dtype=plan.matrix_dtype)
        for seg in plan.segments:
            src = (self.outputs if seg.output else self.tensors)[seg.tensor].reshape(rows, seg.width)
            dst = self.matrix[:, seg.start : seg.start + len(seg.columns)]
            if len(seg.columns) == seg.width:
                dst[...] = src
            else:
                dst[...] = src[:, list(seg.columns)]

    def cut(self, start: int, room: int) -> int:
        """End (exclusive) of the entries from ``start`` that fill ``room`` samples (at least one entry)."""
        off = self.offsets
        end = int(np.searchsorted(off, off[start] + room, side="left"))
        return min(max(end, start + 1), len(self.entries))


class DriftRecorder:
    """Drift histograms and SLIs of one loaded model version, rolled into windows (:class:`ClosedWindow`).

    Attach it with :meth:`TelemetryHub.attach` (which sets ``model.observer = recorder.observe`` and
    ``model.observer_error = recorder.observe_error``), or call those two methods yourself. :meth:`process` (the
    worker) bins what the hot path buffered and returns the windows that closed.
    """

    def __init__(
        self,
        schema: ModelSchema,
        *,
        device_id: str,
        clock: Callable[[], float] = time.time,
        baseline: Summary | None = None,
        policy: WindowPolicy | None = None,
        capacity: int = _DEFAULT_CAPACITY,
        flush_entries: int = _DEFAULT_FLUSH_ENTRIES,
        wake: Callable[[], None] | None = None,
    ) -> None:
        if capacity < 1 or flush_entries < 1:
            raise ValueError("capacity and flush_entries must be at least 1")
        self.schema = schema
        self.model = schema.model
        self.version = schema.version
        self.plan = build_plan(schema, baseline)
        for note in self.plan.skipped:
            log.info("drift of %s@%d: %s", self.model, self.version, note)
        self._binner = BatchBinner([self._edges(n) for n in self.plan.numeric_names],
                                   names=[f"feature {n!r}" for n in self.plan.numeric_names])
        self._clock = clock
        self.roller = WindowRoller(device_id=device_id, model=self.model, version=self.version,
                                   template=self.plan.template, clock=clock, policy=policy,
                                   meta={"drift_edges": self.plan.edges_source})
        self.roller.open_at(clock())  # the first window starts when the recorder does (the model was loaded)
        self._queue: deque[Entry] = deque()
        tensors = self.plan.tensors
        # The common model (one summarised input, one summarised output) takes a hot path without loops.
        self._fast = len(tensors) == 2 and not tensors[0].output and tensors[1].output
        self._first = tensors[0].name if self._fast else ""
        self._second = tensors[1].name if self._fast else ""
        self._capacity = capacity
        self._flush_entries = min(flush_entries, capacity)
        self._wake = wake or (lambda: None)
        self._side = WindowSlis()  # errors and dropped requests, from any thread, under _side_lock
        self._side_lock = threading.Lock()
        self._lock = threading.Lock()  # one process()/close() at a time
        self.rows_dropped = 0
        """Rows dropped because the buffer was full, since the recorder started."""
        self.rows_binned = 0
        self.closed = False

    def _edges(self, name: str) -> Edges:
        feature = self.plan.template[name]
        assert isinstance(feature, NumericHistogram)
        return feature.edges

    # -- hot path (request threads) ----------------------------------------------------------------------------

    def observe(self, inputs: Arrays, outputs: Mapping[str, npt.NDArray[Any]], latency_s: float,
                flags: ServedFlags | None = None) -> None:
        """Record one answered request (``LoadedModel.observer``): O(1), no binning, no lock.

        Appends the request's summarised tensors to a bounded buffer: as ``bytes`` copies for tensors up to 16 KiB
        (a one-row request is ~100-300 bytes; copying costs less than keeping runtime-owned arrays alive until the
        worker frees them, and the caller may reuse its input array), by reference above that. A full buffer drops
        the rows and counts them; the request's SLIs are still counted.
        """
        q = self._queue
        if len(q) >= self._capacity:
            self._drop(inputs, outputs, latency_s, flags)
            return
        if self._fast:
            a = inputs[self._first]
            b = outputs[self._second]
            q.append((a.tobytes() if a.nbytes <= _COPY_LIMIT else a, b.tobytes() if b.nbytes <= _COPY_LIMIT else b,
                      latency_s, flags))
        else:
            q.append((self._grab(inputs, outputs), None, latency_s, flags))
        if len(q) == self._flush_entries:
            self._wake()

    def _grab(self, inputs: Arrays, outputs: Mapping[str, npt.NDArray[Any]]) -> tuple[Any, ...]:
        return tuple(_copy((outputs if t.output else inputs)[t.name]) for t in self.plan.tensors)

    def _entry_rows(self, entry: Entry) -> int:
        if not self.plan.tensors:
            return 0
        data = entry[0] if self._fast else entry[0][0]
        return _nbytes(data) // self.plan.tensors[0].row_bytes

    def _drop(self, inputs: Arrays, outputs: Mapping[str, npt.NDArray[Any]], latency_s: float,
              flags: ServedFlags | None) -> None:
        rows = 0
        if self.plan.tensors:
            t0 = self.plan.tensors[0]
            shape = (outputs if t0.output else inputs)[t0.name].shape
            rows = int(shape[0]) if shape else 1
        with self._side_lock:
            self._side.count_ok(latency_s * 1e6, out_of_range=bool(flags and flags.out_of_range),
                                non_finite=bool(flags and flags.non_finite))
            self._side.rows_dropped += rows
            self.rows_dropped += rows

    def observe_error(self, code: str) -> None:
        """Record one failed request (``LoadedModel.observer_error``): counted in the SLIs, never binned."""
        with self._side_lock:
            self._side.count_error(code)

    def note_load(self, *, swap: bool) -> None:
        """Count a load (or a swap to this version) in the first window."""
        with self._side_lock:
            if swap:
                self._side.swaps += 1
            else:
                self._side.loads += 1

    @property
    def pending(self) -> int:
        """Requests buffered and not binned yet."""
        return len(self._queue)

    # -- worker ------------------------------------------------------------------------------------------------

    def process(self, now: float | None = None) -> list[ClosedWindow]:
        """Bin everything buffered, fold in errors and dropped requests, close windows that are due.

        Returns the windows closed (by sample count, possibly several, then by time). Never raises for bad data.
        """
        with self._lock:
            t = self._clock() if now is None else now
            out: list[ClosedWindow] = []
            self._fold_side()
            q = self._queue
            n = len(q)
            for start in range(0, n, _MAX_BATCH):  # bounded batches bound the scratch memory
                m = min(_MAX_BATCH, n - start)
                self._account([q.popleft() for _ in range(m)], t, out)
            closed = self.roller.poll(t)
            if closed is not None:
                out.append(closed)
            return out

    def close(self, now: float | None = None) -> list[ClosedWindow]:
        """Bin what is buffered and close the open window now (swap, unload, shutdown)."""
        out = self.process(now)
        with self._lock:
            t = self._clock() if now is None else now
            self._fold_side()
            closed = self.roller.close(t)
            if closed is not None:
                out.append(closed)
            self.closed = True
        return out

    def _fold_side(self) -> None:
        with self._side_lock:
            side, self._side = self._side, WindowSlis()
        if not side.empty:
            self.roller.window.slis.merge_from(side)

    def _account(self, entries: list[Entry], now: float, out: list[ClosedWindow]) -> None:
        try:
            batch: _Batch | None = _Batch(self.plan, entries, fast=self._fast)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            log.warning("drift of %s@%d: cannot combine %d requests (%s); binning them one by one",
                        self.model, self.version, len(entries), exc)
            batch = None
        if batch is None:
            for entry in entries:
                self._account_one(entry, now, out)
            return
        start, n = 0, len(entries)
        while start < n:
            end = batch.cut(start, self.roller.room())
            window = self.roller.window
            self._count_slis(window, batch, start, end)
            rows_a, rows_b = int(batch.offsets[start]), int(batch.offsets[end])
            if not self._bin(window, batch, rows_a, rows_b):
                for entry in entries[start:end]:
                    self._bin_one(window, entry)
            if self.roller.due(now) == "samples":
                closed = self.roller.close(now)
                if closed is not None:
                    out.append(closed)
            start = end

    def _account_one(self, entry: Entry, now: float, out: list[ClosedWindow]) -> None:
        window = self.roller.window
        window.slis.count_ok(entry[2] * 1e6, out_of_range=bool(entry[3] and entry[3].out_of_range),
                             non_finite=bool(entry[3] and entry[3].non_finite))
        self._bin_one(window, entry)
        if self.roller.due(now) == "samples":
            closed = self.roller.close(now)
            if closed is not None:
                out.append(closed)

    @staticmethod
    def _count_slis(window: OpenWindow, batch: _Batch, start: int, end: int) -> None:
        oor = int(np.count_nonzero(batch.flags_oor[start:end])) if batch.flags_oor is not None else 0
        nf = int(np.count_nonzero(batch.flags_nf[start:end])) if batch.flags_nf is not None else 0
        window.slis.add_ok_batch(batch.latency_us[start:end], out_of_range=oor, non_finite=nf)

    def _bin_one(self, window: OpenWindow, entry: Entry) -> None:
        rows = self._entry_rows(entry)
        try:
            one = _Batch(self.plan, [entry], fast=self._fast)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            one = None
        if one is None or not self._bin(window, one, 0, int(one.offsets[-1])):
            window.slis.rows_failed += rows

    def _bin(self, window: OpenWindow, batch: _Batch, a: int, b: int) -> bool:
        """Bin rows ``a:b`` of ``batch`` into ``window``; all or nothing. False if the rows cannot be binned."""
        if b <= a:
            return True
        feats = window.features
        updates: dict[str, FeatureSummary] = {}
        try:
            with np.errstate(all="ignore"):
                if self.plan.numeric_names:
                    parts = self._binner.histograms(batch.matrix[a:b])
                    for name, part in zip(self.plan.numeric_names, parts, strict=True):
                        current = feats[name]
                        assert isinstance(current, NumericHistogram)
                        updates[name] = part if current.n == 0 and current.total == 0 else current.merge(part)
                for cat in self.plan.categorical_inputs:
                    col = batch.tensors[cat.tensor].reshape(-1, cat.width)[a:b, cat.column]
                    acc = feats[cat.name]
                    assert isinstance(acc, CategoricalCounts)
                    part_c = acc.empty_like()
                    part_c.add(_category_names(col))
                    updates[cat.name] = acc.merge(part_c)
                for cls in self.plan.class_outputs:
                    updates[cls.name] = self._class_counts(feats[cls.name], cls, batch, a, b)
        except (DriftLayoutError, ValueError, TypeError, FloatingPointError, OverflowError) as exc:
            log.warning("drift of %s@%d: %d rows not binned: %s", self.model, self.version, b - a, exc)
            return False
        feats.update(updates)
        window.samples += b - a
        self.rows_binned += b - a
        return True

    @staticmethod
    def _class_counts(acc: FeatureSummary, cls: _ClassOutput, batch: _Batch, a: int, b: int) -> CategoricalCounts:
        assert isinstance(acc, CategoricalCounts)
        probs = batch.outputs[cls.tensor].reshape(-1, len(cls.labels))[a:b]
        valid = np.isfinite(probs).all(axis=1)
        idx = np.argmax(probs[valid], axis=1) if probs.shape[0] else np.zeros(0, dtype=np.intp)
        per_label: Counter[str] = Counter()
        for i, c in enumerate(np.bincount(idx, minlength=len(cls.labels)).tolist()):
            if c:
                per_label[cls.labels[i]] += c
        missing = int(probs.shape[0] - np.count_nonzero(valid))
        if len(per_label) <= acc.max_categories:
            part = CategoricalCounts.from_dict({"kind": "categorical", "counts": dict(per_label), "other": 0,
                                                "missing": missing, "max_categories": acc.max_categories})
        else:
            part = acc.empty_like()
            labels = np.asarray(cls.labels, dtype=object)
            part.add(np.concatenate([labels[idx], np.full(missing, None, dtype=object)]))
        return acc.merge(part)


# ------------------------------------------------------------------------------------------------------------------
# The hub: recorders of every loaded model, one worker thread, closed windows out
# ------------------------------------------------------------------------------------------------------------------


class TelemetryHub:
    """Drift recorders of all served models, one worker thread, and the closed windows.

    Wiring (the agent service)::

        hub = TelemetryHub(device_id=cfg.device_id,
                           on_closed=lambda w: outbox.append("drift", w.encode))   # the outbox numbers windows
        hub.start()                                   # worker thread: bins every flush_entries requests or flush_s
        hub.attach(host.load(spec))                   # plain [[models]] file: edges from the schema
        hub.attach(host.swap(spec), baseline=manifest.drift_baseline())   # bundle: closes the old version's window
        hub.detach("cancer-mlp")                      # after host.unload
        hub.sync(host.models(), baseline_for)         # safety net (e.g. each tick): attach/detach what changed
        hub.stop()                                    # final windows of every model are delivered

    Delivery, one of:

    * ``on_closed(closed)`` gets each :class:`ClosedWindow`; it numbers and stores it (``closed.encode(seq)``
      builds the frame). If it raises, the window is kept and offered again (first) at the next delivery.
    * ``seq()`` numbers each closed window here (``closed.message(seq())``); the :class:`DriftWindow` goes to
      ``on_window``, or (without it, or if it raises) waits for :meth:`drain_windows`.

    Sinks run on the worker thread, or on the thread that called attach/detach/tick/stop. Waiting windows are
    bounded by ``max_queued``; beyond it the oldest are dropped and counted in ``windows_lost``.
    """

    def __init__(
        self,
        *,
        device_id: str,
        seq: Callable[[], int] | None = None,
        on_window: Callable[[DriftWindow], None] | None = None,
        on_closed: Callable[[ClosedWindow], None] | None = None,
        clock: Callable[[], float] = time.time,
        policy: WindowPolicy | None = None,
        capacity: int = _DEFAULT_CAPACITY,
        flush_entries: int = _DEFAULT_FLUSH_ENTRIES,
        flush_s: float = 1.0,
        max_queued: int = 10_000,
    ) -> None:
        if (on_closed is None) == (seq is None) or (on_closed is not None and on_window is not None):
            raise ValueError("give either on_closed (the sink numbers windows, e.g. the outbox) or seq "
                             "(this hub numbers them; then optionally on_window)")
        self.device_id = device_id
        self.policy = policy or WindowPolicy()
        self._seq = seq
        self._clock = clock
        self._on_window = on_window
        self._on_closed = on_closed
        self._capacity = capacity
        self._flush_entries = flush_entries
        self.flush_s = flush_s
        self._recorders: dict[str, tuple[LoadedModel | None, DriftRecorder]] = {}
        self._lock = threading.RLock()
        self._deliver_lock = threading.Lock()
        self._unsent: deque[ClosedWindow] = deque()  # on_closed failed: offered again first
        self._queued: deque[DriftWindow] = deque()  # for drain_windows()
        self._max_queued = max_queued
        self.windows_sent = 0
        """Windows handed to ``on_closed`` / ``on_window`` or queued for :meth:`drain_windows`."""
        self.windows_lost = 0
        """Windows dropped because more than ``max_queued`` were waiting (sink failing, nobody draining)."""
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- models ----------------------------------------------------------------------------------------------

    def recorder(self, name: str) -> DriftRecorder | None:
        """The recorder of the model ``name``, if attached."""
        with self._lock:
            entry = self._recorders.get(name)
        return entry[1] if entry else None

    def new_recorder(self, schema: ModelSchema, baseline: Summary | None = None) -> DriftRecorder:
        """A recorder with this hub's settings (not attached to anything)."""
        return DriftRecorder(schema, device_id=self.device_id, clock=self._clock, baseline=baseline,
                             policy=self.policy, capacity=self._capacity, flush_entries=self._flush_entries,
                             wake=self._wake.set)

    def attach(self, model: LoadedModel, baseline: Summary | None = None) -> DriftRecorder:
        """Start recording ``model`` (a loaded version). If another version of the same name is attached, this is a
        swap: the old version's window closes now (and is delivered) and the new window counts the swap.

        ``baseline``: the bundle's training baseline (``manifest.drift_baseline()``); without it the input
        edges come from the schema's min/max and the windows say ``"drift_edges": "schema"``.
        """
        with self._lock:
            current = self._recorders.get(model.name)
            if current is not None and current[0] is model:
                return current[1]
            recorder = self.new_recorder(model.schema, baseline)
            recorder.note_load(swap=current is not None)
            now = self._clock()
            closed: list[ClosedWindow] = []
            if current is not None:
                closed = self._retire(current, now)
            self._recorders[model.name] = (model, recorder)
            model.observer = recorder.observe
            model.observer_error = recorder.observe_error
        self._deliver(closed)
        return recorder

    def detach(self, name: str) -> None:
        """Stop recording model ``name`` (unloaded); its open window closes now and is delivered."""
        with self._lock:
            current = self._recorders.pop(name, None)
            closed = self._retire(current, self._clock()) if current is not None else []
        self._deliver(closed)

    def sync(self, models: Iterable[LoadedModel],
             baseline_for: Callable[[LoadedModel], Summary | None] | None = None) -> None:
        """Attach every model not attached yet (or swapped), detach the ones no longer served."""
        live = {m.name: m for m in models}
        with self._lock:
            gone = [name for name in self._recorders if name not in live]
            changed = [m for m in live.values()
                       if (entry := self._recorders.get(m.name)) is None or entry[0] is not m]
        for name in gone:
            self.detach(name)
        for m in changed:
            self.attach(m, baseline_for(m) if baseline_for is not None else None)

    @staticmethod
    def _retire(entry: tuple[LoadedModel | None, DriftRecorder], now: float) -> list[ClosedWindow]:
        model, recorder = entry
        if model is not None and model.observer == recorder.observe:
            model.observer = None
            model.observer_error = None
        return recorder.close(now)

    # -- the worker ------------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[ClosedWindow]:
        """Bin what every recorder buffered and roll windows; deliver the windows that closed and return them."""
        with self._lock:
            recorders = [r for _m, r in self._recorders.values()]
        closed: list[ClosedWindow] = []
        for r in recorders:
            try:
                closed += r.process(now)
            except Exception:  # the top of a task: never let one model stop telemetry for the others
                log.exception("drift processing of %s@%d failed", r.model, r.version)
        self._deliver(closed)
        return closed

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry-drift", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.tick()
            except Exception:  # keep the worker alive whatever a recorder or the sink does
                log.exception("telemetry tick failed")

    def stop(self) -> None:
        """Stop the worker, then close and deliver every model's open window (nothing buffered is lost)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            entries = list(self._recorders.values())
            self._recorders.clear()
            now = self._clock()
            closed = [w for entry in entries for w in self._retire(entry, now)]
        self._deliver(closed)

    # -- output ----------------------------------------------------------------------------------------------

    def _deliver(self, closed: list[ClosedWindow]) -> None:
        with self._deliver_lock:
            backlog = [*self._unsent, *closed]
            self._unsent.clear()
            for i, c in enumerate(backlog):
                if self._on_closed is not None:
                    try:
                        self._on_closed(c)
                    except Exception:  # e.g. the outbox's disk is full: keep the window, offer it again later
                        log.exception("drift window sink failed for %s@%d; will retry", c.model, c.version)
                        self._keep(self._unsent, backlog[i:])
                        return
                    self.windows_sent += 1
                    continue
                assert self._seq is not None
                window = c.message(self._seq())
                self.windows_sent += 1
                if self._on_window is not None:
                    try:
                        self._on_window(window)
                        continue
                    except Exception:
                        log.exception("drift window sink failed; keeping window %d for drain_windows()",
                                      window.stream_seq)
                self._keep(self._queued, [window])

    def _keep(self, queue: deque[Any], items: Sequence[Any]) -> None:
        for item in items:
            if len(queue) >= self._max_queued:
                queue.popleft()
                self.windows_lost += 1
            queue.append(item)

    def drain_windows(self) -> list[DriftWindow]:
        """Numbered windows not handed to ``on_window`` (oldest first); each is returned once."""
        out: list[DriftWindow] = []
        while self._queued:
            out.append(self._queued.popleft())
        return out
