"""Reading and validating firmware profile TOML files.

The schema is strict on purpose: a profile decides how many threads the agent starts, which
accelerators it tries and how much memory and model size it allows, so a typo must fail loudly at
load time (with the file, the key and the allowed values in the message) instead of silently falling
back to a default on a device in the field. Every problem is reported as a :class:`ProfileError`.

Only the standard library is used (this is a shared-contract package) and nothing is read at import
time; all filesystem access happens inside the public functions.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import TypeVar

from agent.profiles._model import (
    ARCHITECTURES,
    CPU_EXECUTION_PROVIDER,
    CPU_TFLITE_DELEGATES,
    GRAPH_OPTIMIZATIONS,
    MIB,
    QUANTIZATIONS,
    RUNTIMES,
    TFLITE_DELEGATES,
    FirmwareProfile,
    OnnxSettings,
    ProfileError,
    ProfileLimits,
    TfliteSettings,
    UnknownProfileError,
)

PROFILE_NAME_PATTERN = r"[a-z0-9][a-z0-9-]*"
"""A profile name (and therefore its file stem): lowercase letters, digits and ``-``."""

PROFILE_SUFFIX = ".toml"

# Numeric ranges of the schema (inclusive). Thread counts are further capped by ``cores`` and the
# memory budget by ``memory_mb``; see docs/firmware-profiles.md.
CORES_RANGE = (1, 256)
MEMORY_MB_RANGE = (64, 1_048_576)
MAX_MODEL_MB_RANGE = (1, 65_536)
MIN_AGENT_MEMORY_BUDGET_MB = 16

_NAME_RE = re.compile(PROFILE_NAME_PATTERN)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_PROVIDER_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*ExecutionProvider")

_TOP_KEYS = (
    "name",
    "display_name",
    "architecture",
    "cores",
    "memory_mb",
    "low_power",
    "source",
    "runtimes",
    "limits",
)
_RUNTIMES_KEYS = ("order", "onnx", "tflite")
_ONNX_KEYS = (
    "execution_providers",
    "intra_op_threads",
    "inter_op_threads",
    "allow_spinning",
    "graph_optimization",
)
_TFLITE_KEYS = ("delegates", "threads")
_LIMITS_KEYS = ("max_model_mb", "agent_memory_budget_mb", "quantizations")

# Provider names ONNX Runtime knows (``onnxruntime.get_all_providers()``), used only to catch
# wrong capitalisation ("CudaExecutionProvider"): well-formed names not in this list are accepted,
# because new providers appear with new onnxruntime releases and an unavailable provider is
# skipped at run time anyway.
_KNOWN_ONNX_PROVIDERS = (
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "AzureExecutionProvider",
    "CANNExecutionProvider",
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "DnnlExecutionProvider",
    "JsExecutionProvider",
    "MIGraphXExecutionProvider",
    "NnapiExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
    "ROCMExecutionProvider",
    "RknpuExecutionProvider",
    "TensorrtExecutionProvider",
    "VSINPUExecutionProvider",
    "VitisAIExecutionProvider",
    "WebGpuExecutionProvider",
    "WebNNExecutionProvider",
    "XnnpackExecutionProvider",
)
_PROVIDERS_BY_LOWER = {p.lower(): p for p in _KNOWN_ONNX_PROVIDERS}

# Common other spellings of the architectures, so "arm64" gets "did you mean 'aarch64'?".
_ARCHITECTURE_ALIASES = {
    "arm64": "aarch64",
    "armv8": "aarch64",
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "x64": "x86_64",
    "armhf": "armv7l",
    "armv7": "armv7l",
}

# Other common names of the quantization formats.
_QUANTIZATION_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "qint8": "int8",
    "quint8": "uint8",
}

_S = TypeVar("_S", bound=str)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def parse_profile(
    data: bytes | str, *, source_name: str, expected_name: str | None = None
) -> FirmwareProfile:
    """Validate profile TOML held in memory and return the typed profile.

    Pure: no filesystem access. ``source_name`` (usually the file name) prefixes every error
    message. When ``expected_name`` is given (the file stem, as :func:`load_profile` passes), the
    profile's ``name`` must equal it. Raises :class:`ProfileError` for every kind of problem.
    """
    return _parse(data, _Context(source_name=source_name, path=None), expected_name)


def load_profile(path: str | os.PathLike[str]) -> FirmwareProfile:
    """Read and validate one profile file; its ``name`` must equal the file stem.

    Raises :class:`ProfileError` (with ``path`` set) if the file cannot be read or is invalid.
    """
    file = Path(path)
    ctx = _Context(source_name=file.name, path=str(file))
    try:
        data = file.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ctx.error("", f"cannot read profile file {str(file)!r}: {reason}") from exc
    return _parse(data, ctx, file.stem)


def load_profiles(directory: str | os.PathLike[str]) -> dict[str, FirmwareProfile]:
    """Load every ``*.toml`` profile in ``directory`` (not recursive), keyed by profile name.

    Hidden files (names starting with ``.``, e.g. editor backups) are ignored. The result is in
    name order. The first invalid file stops the load with its :class:`ProfileError`: a fleet must
    not run with a half-read set of profiles.
    """
    folder = _require_directory(Path(directory))
    profiles: dict[str, FirmwareProfile] = {}
    for file in _profile_files(folder):
        profile = load_profile(file)
        profiles[profile.name] = profile
    return profiles


def builtin_profiles_dir() -> Path:
    """Where the profiles shipped with the agent live.

    An installed wheel carries the repository's ``firmware_profiles/`` as
    ``agent/profiles/builtin/`` (hatch ``force-include``). A source or editable checkout has no
    such folder, so fall back to ``<repo root>/firmware_profiles``. Raises :class:`ProfileError`
    if neither exists (a broken install).
    """
    package_dir = Path(__file__).parent
    installed = package_dir / "builtin"
    if installed.is_dir():
        return installed
    checkout = package_dir.parents[1] / "firmware_profiles"
    if checkout.is_dir():
        return checkout
    raise ProfileError(
        "no built-in firmware profiles found: neither "
        f"{str(installed)!r} (installed wheel) nor {str(checkout)!r} (source checkout) is a directory"
    )


def resolve_profile(name: str, directory: str | os.PathLike[str] | None = None) -> FirmwareProfile:
    """Load the profile called ``name`` from ``directory`` (default: :func:`builtin_profiles_dir`).

    Only that one file is read, so an unrelated broken profile does not block this one. Raises
    :class:`UnknownProfileError` listing the available names if there is no such profile (names
    are matched against the directory listing, so ``name`` can never escape the directory), or
    :class:`ProfileError` if the file is invalid.
    """
    folder = builtin_profiles_dir() if directory is None else _require_directory(Path(directory))
    available = {file.stem: file for file in _profile_files(folder)}
    if name not in available:
        raise UnknownProfileError(name, available, path=str(folder))
    return load_profile(available[name])


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _require_directory(folder: Path) -> Path:
    """Return ``folder`` if it is a directory, else raise a :class:`ProfileError` about it."""
    if not folder.is_dir():
        raise ProfileError(
            f"{str(folder)!r} is not a directory of firmware profiles (missing or not a directory)",
            path=str(folder),
        )
    return folder


def _profile_files(folder: Path) -> list[Path]:
    """The candidate profile files of ``folder``: visible regular ``*.toml`` files, sorted."""
    return sorted(
        file
        for file in folder.iterdir()
        if file.suffix == PROFILE_SUFFIX and not file.name.startswith(".") and file.is_file()
    )


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    """Where the data being validated came from, for error messages."""

    source_name: str
    path: str | None

    def error(self, field: str, problem: str) -> ProfileError:
        """Build the error for ``field`` (``""`` = whole file); ``problem`` follows the field."""
        subject = f"{field} {problem}" if field else problem
        return ProfileError(f"{self.source_name}: {subject}", path=self.path, field=field)


def _parse(data: bytes | str, ctx: _Context, expected_name: str | None) -> FirmwareProfile:
    """Decode, parse and validate; the shared body of :func:`parse_profile` and :func:`load_profile`."""
    doc = _decode_toml(data, ctx)
    _check_keys(ctx, doc, "", _TOP_KEYS)

    name = _string(ctx, doc, "", "name", "a profile name")
    if not _NAME_RE.fullmatch(name):
        raise ctx.error(
            "name",
            f"= {_show(name)} is not a valid profile name; allowed: lowercase letters, digits and '-',"
            f" starting with a letter or digit (pattern {PROFILE_NAME_PATTERN})",
        )
    if expected_name is not None and name != expected_name:
        raise ctx.error(
            "name",
            f"= {_show(name)} does not match the file name; the name must equal the file stem"
            f" {_show(expected_name)} (rename the file or fix the name)",
        )
    display_name = _string(ctx, doc, "", "display_name", "a human-readable device name")
    architecture = _choice(ctx, doc, "", "architecture", ARCHITECTURES, aliases=_ARCHITECTURE_ALIASES)
    cores = _integer(ctx, doc, "", "cores", CORES_RANGE)
    memory_mb = _integer(ctx, doc, "", "memory_mb", MEMORY_MB_RANGE)
    low_power = _boolean(ctx, doc, "", "low_power")
    source = _string_list(ctx, doc, "", "source", "vendor datasheet URLs and titles")

    runtimes = _table(ctx, doc, "", "runtimes")
    _check_keys(ctx, runtimes, "runtimes", _RUNTIMES_KEYS)
    runtime_order = _choice_list(ctx, runtimes, "runtimes", "order", RUNTIMES, allow_empty=False)
    for runtime in RUNTIMES:
        field = _join("runtimes", runtime)
        if runtime in runtime_order and runtime not in runtimes:
            raise ctx.error(
                field,
                f"is missing; it is required because {_show(runtime)} is in runtimes.order"
                f" (add a [{field}] table or remove {_show(runtime)} from runtimes.order)",
            )
        if runtime in runtimes and runtime not in runtime_order:
            raise ctx.error(
                field,
                f"is present but {_show(runtime)} is not in runtimes.order ="
                f" {_show(list(runtime_order))}; add it to the order or delete the table",
            )
    onnx = _parse_onnx(ctx, runtimes, cores) if "onnx" in runtime_order else None
    tflite = _parse_tflite(ctx, runtimes, cores) if "tflite" in runtime_order else None
    limits = _parse_limits(ctx, doc, memory_mb)

    return FirmwareProfile(
        name=name,
        display_name=display_name,
        architecture=architecture,
        cores=cores,
        memory_mb=memory_mb,
        low_power=low_power,
        source=source,
        runtime_order=runtime_order,
        onnx=onnx,
        tflite=tflite,
        limits=limits,
    )


def _decode_toml(data: bytes | str, ctx: _Context) -> Mapping[str, object]:
    """Turn bytes/str into the TOML document, mapping every failure to a whole-file error."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ctx.error(
                "", f"not valid UTF-8 (bad byte at offset {exc.start}); profiles must be UTF-8 TOML"
            ) from exc
    elif isinstance(data, str):
        text = data
    else:  # a caller ignoring the type hints; still a ProfileError, not a TypeError from tomllib
        raise ctx.error("", f"profile data must be bytes or str, not {type(data).__name__}")
    text = text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark written by some editors
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise ctx.error("", f"invalid TOML: {exc}") from exc


def _parse_onnx(ctx: _Context, runtimes: Mapping[str, object], cores: int) -> OnnxSettings:
    """Validate ``[runtimes.onnx]``."""
    prefix = "runtimes.onnx"
    table = _table(ctx, runtimes, "runtimes", "onnx")
    _check_keys(ctx, table, prefix, _ONNX_KEYS)

    field = _join(prefix, "execution_providers")
    providers = _string_list(ctx, table, prefix, "execution_providers", "ONNX Runtime provider names")
    for index, provider in enumerate(providers):
        item = f"{field}[{index}]"
        known = _PROVIDERS_BY_LOWER.get(provider.lower())
        if known is not None and known != provider:
            raise ctx.error(
                item,
                f"= {_show(provider)} has the wrong capitalisation; did you mean {_show(known)}?"
                " (provider names are case-sensitive)",
            )
        if not _PROVIDER_RE.fullmatch(provider):
            raise ctx.error(
                item,
                f"= {_show(provider)} is not an ONNX Runtime provider name; allowed: names like"
                f" {_show(CPU_EXECUTION_PROVIDER)} (letters and digits ending in 'ExecutionProvider')",
            )
    _reject_duplicates(ctx, field, providers)
    if providers[-1] != CPU_EXECUTION_PROVIDER:
        raise ctx.error(
            field,
            f"= {_show(list(providers))} must end with {_show(CPU_EXECUTION_PROVIDER)}; it is the"
            " fallback that every onnxruntime build has, so the list can never run dry",
        )

    cores_cap = (CORES_RANGE[0], cores)
    intra = _integer(ctx, table, prefix, "intra_op_threads", cores_cap, upper_name="cores")
    inter = _integer(ctx, table, prefix, "inter_op_threads", cores_cap, upper_name="cores")
    spinning = _boolean(ctx, table, prefix, "allow_spinning")
    optimization = _choice(ctx, table, prefix, "graph_optimization", GRAPH_OPTIMIZATIONS)
    return OnnxSettings(
        execution_providers=providers,
        intra_op_threads=intra,
        inter_op_threads=inter,
        allow_spinning=spinning,
        graph_optimization=optimization,
    )


def _parse_tflite(ctx: _Context, runtimes: Mapping[str, object], cores: int) -> TfliteSettings:
    """Validate ``[runtimes.tflite]``."""
    prefix = "runtimes.tflite"
    table = _table(ctx, runtimes, "runtimes", "tflite")
    _check_keys(ctx, table, prefix, _TFLITE_KEYS)

    field = _join(prefix, "delegates")
    delegates = _choice_list(ctx, table, prefix, "delegates", TFLITE_DELEGATES, allow_empty=True)
    cpu_like = [d for d in delegates if d in CPU_TFLITE_DELEGATES]
    if len(cpu_like) > 1:
        raise ctx.error(
            field,
            f"= {_show(list(delegates))} lists both {_show(cpu_like[0])} and {_show(cpu_like[1])},"
            " which both mean LiteRT's built-in CPU kernels; keep one",
        )
    if cpu_like and delegates[-1] != cpu_like[0]:
        later = delegates[delegates.index(cpu_like[0]) + 1]
        raise ctx.error(
            field,
            f"= {_show(list(delegates))} puts {_show(cpu_like[0])} before {_show(later)};"
            f" {_show(cpu_like[0])} (the built-in CPU kernels) is always available, so it must come"
            " last or the delegates after it are never tried",
        )
    threads = _integer(ctx, table, prefix, "threads", (CORES_RANGE[0], cores), upper_name="cores")
    return TfliteSettings(delegates=delegates, threads=threads)


def _parse_limits(ctx: _Context, doc: Mapping[str, object], memory_mb: int) -> ProfileLimits:
    """Validate ``[limits]`` and convert its MiB figures to bytes."""
    prefix = "limits"
    table = _table(ctx, doc, "", "limits")
    _check_keys(ctx, table, prefix, _LIMITS_KEYS)

    lo, hi = MAX_MODEL_MB_RANGE
    model_cap = (lo, min(hi, memory_mb))
    model_mb = _integer(
        ctx, table, prefix, "max_model_mb", model_cap, upper_name="memory_mb" if memory_mb < hi else ""
    )
    budget_mb = _integer(
        ctx,
        table,
        prefix,
        "agent_memory_budget_mb",
        (MIN_AGENT_MEMORY_BUDGET_MB, memory_mb),
        upper_name="memory_mb",
    )
    quantizations = _choice_list(
        ctx, table, prefix, "quantizations", QUANTIZATIONS, allow_empty=False, aliases=_QUANTIZATION_ALIASES
    )
    return ProfileLimits(
        max_model_bytes=model_mb * MIB,
        agent_memory_budget_bytes=budget_mb * MIB,
        quantizations=frozenset(quantizations),
    )


# --------------------------------------------------------------------------------------------------
# Typed accessors. ``table`` is the TOML table, ``prefix`` its dotted name ("" at the top level).
# --------------------------------------------------------------------------------------------------


def _check_keys(ctx: _Context, table: Mapping[str, object], prefix: str, allowed: tuple[str, ...]) -> None:
    """Reject keys the schema does not know, suggesting the closest known key."""
    unknown = [key for key in table if key not in allowed]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if prefix and key in _TOP_KEYS:
        hint += f"({key!r} is a top-level key: put it above the first [table] header) "
    others = ""
    if len(unknown) > 1:
        others = " (also unknown: " + ", ".join(_join(prefix, k) for k in unknown[1:]) + ")"
    where = f"[{prefix}]" if prefix else "the top level"
    raise ctx.error(
        _join(prefix, key),
        f"is not a known key{others}; {hint}allowed keys in {where}: {', '.join(allowed)}",
    )


def _require(ctx: _Context, table: Mapping[str, object], prefix: str, key: str, expected: str) -> object:
    """Return ``table[key]`` or raise "missing" naming what was expected."""
    if key not in table:
        hint = "" if prefix else _misplaced_hint(table, key)
        raise ctx.error(_join(prefix, key), f"is missing; required: {expected}{hint}")
    return table[key]


def _misplaced_hint(doc: Mapping[str, object], key: str, prefix: str = "") -> str:
    """Explain a missing top-level ``key`` that was written below a ``[table]`` header instead."""
    for name, value in doc.items():
        if isinstance(value, dict):
            where = _join(prefix, name)
            if key in value:
                return (
                    f" (found {where}.{key}: top-level keys must come before the first [table] header,"
                    " otherwise TOML puts them inside that table)"
                )
            deeper = _misplaced_hint(value, key, where)
            if deeper:
                return deeper
    return ""


def _wrong_type(ctx: _Context, field: str, value: object, expected: str) -> ProfileError:
    """The error for a value of the wrong TOML type."""
    note = " (true/false is not a number here)" if isinstance(value, bool) else ""
    return ctx.error(field, f"= {_show(value)} is {_type_name(value)}{note}; expected {expected}")


def _integer(
    ctx: _Context,
    table: Mapping[str, object],
    prefix: str,
    key: str,
    bounds: tuple[int, int],
    *,
    upper_name: str = "",
) -> int:
    """An integer (never a bool) within ``bounds``; ``upper_name`` explains where the cap comes from."""
    lo, hi = bounds
    allowed = f"{lo}..{hi}" + (f" ({upper_name})" if upper_name else "")
    field = _join(prefix, key)
    value = _require(ctx, table, prefix, key, f"an integer in {allowed}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(ctx, field, value, f"an integer in {allowed}")
    if not lo <= value <= hi:
        raise ctx.error(field, f"= {value} is out of range; allowed {allowed}")
    return value


def _boolean(ctx: _Context, table: Mapping[str, object], prefix: str, key: str) -> bool:
    """A TOML boolean (``true``/``false``), not a string or number."""
    value = _require(ctx, table, prefix, key, "true or false")
    if not isinstance(value, bool):
        raise _wrong_type(ctx, _join(prefix, key), value, "true or false")
    return value


def _string(ctx: _Context, table: Mapping[str, object], prefix: str, key: str, what: str) -> str:
    """A non-blank string."""
    field = _join(prefix, key)
    value = _require(ctx, table, prefix, key, f"a string ({what})")
    if not isinstance(value, str):
        raise _wrong_type(ctx, field, value, f"a string ({what})")
    if not value.strip():
        raise ctx.error(field, f"= {_show(value)} is blank; expected a non-empty string ({what})")
    return value


def _choice(
    ctx: _Context,
    table: Mapping[str, object],
    prefix: str,
    key: str,
    allowed: tuple[_S, ...],
    *,
    aliases: Mapping[str, str] | None = None,
) -> _S:
    """A string that must be one of ``allowed``."""
    field = _join(prefix, key)
    listing = ", ".join(allowed)
    value = _require(ctx, table, prefix, key, f"one of {listing}")
    if not isinstance(value, str):
        raise _wrong_type(ctx, field, value, f"a string, one of {listing}")
    chosen = _pick(value, allowed)
    if chosen is None:
        raise ctx.error(field, f"= {_show(value)} is not allowed; {_suggest(value, allowed, aliases)}")
    return chosen


def _table(ctx: _Context, parent: Mapping[str, object], prefix: str, key: str) -> Mapping[str, object]:
    """A TOML table (``[name]`` section or inline ``{...}``)."""
    field = _join(prefix, key)
    value = _require(ctx, parent, prefix, key, f"a [{field}] table")
    if not isinstance(value, dict):
        raise _wrong_type(ctx, field, value, f"a [{field}] table")
    return value


def _array(ctx: _Context, table: Mapping[str, object], prefix: str, key: str, what: str) -> list[object]:
    """A TOML array, untyped items."""
    value = _require(ctx, table, prefix, key, f"an array of {what}")
    if not isinstance(value, list):
        raise _wrong_type(ctx, _join(prefix, key), value, f"an array of {what}")
    return value


def _string_list(
    ctx: _Context, table: Mapping[str, object], prefix: str, key: str, what: str
) -> tuple[str, ...]:
    """A non-empty array of non-blank strings."""
    field = _join(prefix, key)
    items = _array(ctx, table, prefix, key, f"strings ({what})")
    if not items:
        raise ctx.error(field, f"= [] is empty; expected at least one string ({what})")
    result: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _wrong_type(ctx, f"{field}[{index}]", item, f"a string ({what})")
        if not item.strip():
            raise ctx.error(f"{field}[{index}]", f"= {_show(item)} is blank; expected a non-empty string")
        result.append(item)
    return tuple(result)


def _choice_list(
    ctx: _Context,
    table: Mapping[str, object],
    prefix: str,
    key: str,
    allowed: tuple[_S, ...],
    *,
    allow_empty: bool,
    aliases: Mapping[str, str] | None = None,
) -> tuple[_S, ...]:
    """An array of distinct strings, each one of ``allowed`` (order preserved)."""
    field = _join(prefix, key)
    listing = ", ".join(allowed)
    items = _array(ctx, table, prefix, key, f"strings from {listing}")
    if not items and not allow_empty:
        raise ctx.error(field, f"= [] is empty; expected at least one of {listing}")
    result: list[_S] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _wrong_type(ctx, f"{field}[{index}]", item, f"a string, one of {listing}")
        chosen = _pick(item, allowed)
        if chosen is None:
            raise ctx.error(
                f"{field}[{index}]", f"= {_show(item)} is not allowed; {_suggest(item, allowed, aliases)}"
            )
        result.append(chosen)
    _reject_duplicates(ctx, field, result)
    return tuple(result)


def _reject_duplicates(ctx: _Context, field: str, items: Sequence[str]) -> None:
    """Reject a preference list that names an entry twice (the second mention would be dead)."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise ctx.error(
                field,
                f"= {_show(list(items))} lists {_show(item)} more than once; each entry may appear once",
            )
        seen.add(item)


# --------------------------------------------------------------------------------------------------
# Message helpers
# --------------------------------------------------------------------------------------------------


def _pick(value: str, allowed: tuple[_S, ...]) -> _S | None:
    """The member of ``allowed`` equal to ``value`` (typed as the literal), or ``None``."""
    for option in allowed:
        if option == value:
            return option
    return None


def _suggest(value: str, allowed: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    """``"did you mean X? allowed: a, b, c"`` with X from ``aliases`` or the closest spelling."""
    close = (aliases or {}).get(value.lower())
    if close is None:
        matches = difflib.get_close_matches(value.lower(), allowed, n=1, cutoff=0.6)
        close = matches[0] if matches else None
    hint = f"did you mean {_show(close)}? " if close else ""
    return f"{hint}allowed: {', '.join(allowed)}"


def _join(prefix: str, key: str) -> str:
    """Dotted TOML name of ``key`` inside ``prefix``, quoting keys that are not bare keys."""
    shown = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{prefix}.{shown}" if prefix else shown


def _type_name(value: object) -> str:
    """TOML name of the value's type, with an article, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return f"a {type(value).__name__}"


def _show(value: object, limit: int = 80) -> str:
    """Render a parsed TOML value the way it would look in the file, shortened for messages."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(item, limit) for item in value) + "]"
    elif isinstance(value, dict):
        inner = ", ".join(f"{_join('', str(k))} = {_show(v, limit)}" for k, v in value.items())
        text = "{" + inner + "}"
    elif isinstance(value, datetime | date | time):
        text = value.isoformat()
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
