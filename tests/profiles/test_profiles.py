"""Tests for the firmware profiles in ``firmware_profiles/`` and their loader ``agent.profiles``.

Each invalid-profile test is named after the mistake it proves is caught, and checks that the
error names the file and the field so an operator can fix the profile from the message alone.
"""

from __future__ import annotations

import copy
import json
import pickle
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.profiles._loader as loader_module
from agent.profiles import (
    ARCHITECTURES,
    CPU_EXECUTION_PROVIDER,
    EDGETPU_DELEGATE_LIBRARY,
    MIB,
    FirmwareProfile,
    ProfileError,
    UnknownProfileError,
    builtin_profiles_dir,
    load_profile,
    load_profiles,
    parse_profile,
    resolve_profile,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = REPO_ROOT / "firmware_profiles"
REQUIRED_PROFILES = (
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "coral-dev-board",
    "generic-x86-64",
)
SHIPPED_FILES = sorted(FIRMWARE_DIR.glob("*.toml"))


# --------------------------------------------------------------------------------------------------
# Helpers: a valid profile as a dict, a tiny TOML writer, and a way to assert on errors.
# --------------------------------------------------------------------------------------------------


def valid_doc(name: str = "test-board") -> dict[str, Any]:
    """A complete, valid profile document (4 cores, 2 GB) for tests to break one field at a time."""
    return {
        "name": name,
        "display_name": "Test Board",
        "architecture": "aarch64",
        "cores": 4,
        "memory_mb": 2048,
        "low_power": True,
        "source": ["https://example.com/brief.pdf (Test Board product brief)"],
        "runtimes": {
            "order": ["onnx", "tflite"],
            "onnx": {
                "execution_providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"],
                "intra_op_threads": 4,
                "inter_op_threads": 1,
                "allow_spinning": False,
                "graph_optimization": "all",
            },
            "tflite": {"delegates": ["xnnpack"], "threads": 4},
        },
        "limits": {
            "max_model_mb": 64,
            "agent_memory_budget_mb": 256,
            "quantizations": ["int8", "uint8", "fp16", "fp32"],
        },
    }


def toml_value(value: Any) -> str:
    """Render a scalar or array as TOML (enough for profile documents)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON escapes are valid in TOML basic strings; TOML also forbids a raw DEL character.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Write ``doc`` as TOML: scalars first, then one ``[table]`` section per nested dict."""
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + "\n"
    for key, value in doc.items():
        if isinstance(value, dict):
            header = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            text += f"\n[{header}]\n" + to_toml(value, header)
    return text


def write_profile(directory: Path, doc: dict[str, Any], stem: str | None = None) -> Path:
    """Write ``doc`` to ``<directory>/<stem or doc name>.toml`` and return the path."""
    path = directory / f"{stem or doc['name']}.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    return path


def load_error(path: Path) -> ProfileError:
    """Load ``path`` expecting a ProfileError that names the file; return the error."""
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    error = caught.value
    assert str(error).startswith(f"{path.name}: "), str(error)
    assert error.path == str(path)
    return error


def assert_field(error: ProfileError, field: str, *fragments: str) -> None:
    """The error is about ``field`` and its message names it along with each fragment."""
    message = str(error)
    assert error.field == field, message
    assert field in message, message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------------------------------
# The shipped profiles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_every_shipped_profile_loads_and_its_name_equals_the_file_stem(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.source and all(entry.startswith("https://") for entry in profile.source)


@pytest.mark.parametrize("name", REQUIRED_PROFILES)
def test_required_profile_is_shipped(name: str) -> None:
    assert (FIRMWARE_DIR / f"{name}.toml").is_file()
    assert name in load_profiles(FIRMWARE_DIR)


def test_shipped_profiles_start_with_a_header_comment() -> None:
    for path in SHIPPED_FILES:
        assert path.read_text(encoding="utf-8").startswith("# Firmware profile: "), path.name


def test_shipped_profiles_are_found_via_builtin_dir_and_resolve() -> None:
    wheel_copy = Path(loader_module.__file__).parent / "builtin"
    assert builtin_profiles_dir().resolve() in {FIRMWARE_DIR.resolve(), wheel_copy.resolve()}
    for name in REQUIRED_PROFILES:
        assert resolve_profile(name).name == name


def test_low_power_boards_do_not_spin_and_fit_small_budgets() -> None:
    profiles = load_profiles(FIRMWARE_DIR)
    for name in ("raspberry-pi-4", "raspberry-pi-5", "coral-dev-board", "jetson-orin-nano"):
        profile = profiles[name]
        assert profile.low_power
        assert profile.onnx is not None and not profile.onnx.allow_spinning
    for name in ("raspberry-pi-4", "raspberry-pi-5", "coral-dev-board"):
        budget = profiles[name].limits.agent_memory_budget_bytes
        assert 192 * MIB <= budget <= 512 * MIB, name
    for name in ("jetson-orin-nano", "generic-x86-64"):
        assert profiles[name].limits.agent_memory_budget_bytes >= 512 * MIB, name


def test_jetson_prefers_tensorrt_then_cuda_then_cpu_and_allows_fp16() -> None:
    jetson = resolve_profile("jetson-orin-nano", FIRMWARE_DIR)
    assert jetson.cores == 6
    assert jetson.memory_mb == 8192
    assert jetson.onnx is not None
    assert jetson.onnx.execution_providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert jetson.supports_quantization("fp16")


def test_coral_is_tflite_first_with_edgetpu_delegate_and_8bit_only() -> None:
    coral = resolve_profile("coral-dev-board", FIRMWARE_DIR)
    assert coral.runtime_order == ("tflite", "onnx")
    assert coral.tflite is not None
    assert coral.tflite.delegates == ("edgetpu", "xnnpack")
    assert coral.memory_mb == 1024
    assert coral.supports_quantization("int8")
    assert coral.supports_quantization("uint8")
    assert not coral.supports_quantization("fp32")
    assert EDGETPU_DELEGATE_LIBRARY == "libedgetpu.so.1"
    assert EDGETPU_DELEGATE_LIBRARY in (FIRMWARE_DIR / "coral-dev-board.toml").read_text(encoding="utf-8")


def test_raspberry_pis_use_the_vendor_core_counts() -> None:
    for name in ("raspberry-pi-4", "raspberry-pi-5"):
        profile = resolve_profile(name, FIRMWARE_DIR)
        assert (profile.architecture, profile.cores) == ("aarch64", 4)
    assert resolve_profile("generic-x86-64", FIRMWARE_DIR).architecture == "x86_64"


# --------------------------------------------------------------------------------------------------
# The loader on valid input
# --------------------------------------------------------------------------------------------------


def test_valid_profile_converts_to_typed_fields(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, valid_doc()))
    assert isinstance(profile, FirmwareProfile)
    assert profile.source == ("https://example.com/brief.pdf (Test Board product brief)",)
    assert profile.runtime_order == ("onnx", "tflite")
    assert profile.onnx is not None and profile.onnx.intra_op_threads == 4
    assert profile.tflite is not None and profile.tflite.delegates == ("xnnpack",)
    assert profile.limits.max_model_bytes == 64 * 1024 * 1024
    assert profile.limits.agent_memory_budget_bytes == 256 * 1024 * 1024
    assert profile.limits.quantizations == frozenset({"int8", "uint8", "fp16", "fp32"})
    assert profile.supports_runtime("onnx") and profile.supports_runtime("tflite")
    assert not profile.supports_runtime("tensorrt")
    assert not profile.supports_quantization("int4")


def test_profile_is_frozen() -> None:
    profile = parse_profile(to_toml(valid_doc()), source_name="test-board.toml")
    with pytest.raises(AttributeError):
        profile.cores = 8  # type: ignore[misc]


def test_runtime_absent_from_order_has_no_settings(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"] = {"order": ["tflite"], "tflite": {"delegates": [], "threads": 2}}
    profile = load_profile(write_profile(tmp_path, doc))
    assert profile.onnx is None
    assert profile.tflite is not None and profile.tflite.delegates == ()
    assert not profile.supports_runtime("onnx")


def test_parse_profile_accepts_bytes_and_str_alike() -> None:
    text = to_toml(valid_doc())
    as_str = parse_profile(text, source_name="test-board.toml")
    as_bytes = parse_profile(text.encode(), source_name="test-board.toml")
    with_bom = parse_profile(b"\xef\xbb\xbf" + text.encode(), source_name="test-board.toml")
    assert as_str == as_bytes == with_bom


def test_load_profiles_ignores_hidden_and_non_toml_files(tmp_path: Path) -> None:
    write_profile(tmp_path, valid_doc("board-a"))
    write_profile(tmp_path, valid_doc("board-b"))
    (tmp_path / "README.md").write_text("not a profile", encoding="utf-8")
    (tmp_path / ".board-a.toml").write_text("editor backup = [", encoding="utf-8")
    assert list(load_profiles(tmp_path)) == ["board-a", "board-b"]


# --------------------------------------------------------------------------------------------------
# Each kind of invalid profile is rejected with the file and the field in the message
# --------------------------------------------------------------------------------------------------


def test_unknown_key_is_rejected_with_closest_known_key_suggested(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["onnx"]["intra_op_thread"] = doc["runtimes"]["onnx"].pop("intra_op_threads")
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.onnx.intra_op_thread", "not a known key", "did you mean 'intra_op_threads'")


def test_unknown_top_level_key_is_rejected_with_suggestion(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["dispaly_name"] = doc.pop("display_name")
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "dispaly_name", "did you mean 'display_name'", "allowed keys")


def test_unknown_runtime_table_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["tensorrt"] = {"threads": 1}
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.tensorrt", "not a known key", "order, onnx, tflite")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("cores",), "cores"),
        (("source",), "source"),
        (("limits",), "limits"),
        (("limits", "max_model_mb"), "limits.max_model_mb"),
        (("runtimes", "onnx", "graph_optimization"), "runtimes.onnx.graph_optimization"),
        (("runtimes", "tflite", "threads"), "runtimes.tflite.threads"),
    ],
)
def test_missing_key_is_rejected_naming_the_field(tmp_path: Path, path: tuple[str, ...], field: str) -> None:
    doc = valid_doc()
    table = doc
    for key in path[:-1]:
        table = table[key]
    del table[path[-1]]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, field, "is missing", "required")


def test_top_level_key_written_under_a_table_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "test-board.toml"
    doc = valid_doc()
    del doc["low_power"]
    path.write_text(to_toml(doc) + "low_power = true\n", encoding="utf-8")  # lands in [limits]
    error = load_error(path)
    assert_field(error, "low_power", "is missing", "limits.low_power", "before the first [table] header")


@pytest.mark.parametrize(
    ("path", "bad", "field"),
    [
        (("cores",), "4", "cores"),
        (("memory_mb",), 2048.0, "memory_mb"),
        (("low_power",), "yes", "low_power"),
        (("source",), "https://example.com", "source"),
        (("runtimes", "onnx", "allow_spinning"), 0, "runtimes.onnx.allow_spinning"),
        (("runtimes", "order"), "onnx", "runtimes.order"),
        (("limits",), 5, "limits"),
    ],
)
def test_wrong_type_is_rejected_with_expected_type(
    tmp_path: Path, path: tuple[str, ...], bad: object, field: str
) -> None:
    doc = valid_doc()
    table = doc
    for key in path[:-1]:
        table = table[key]
    table[path[-1]] = bad
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, field, "expected")


def test_wrong_type_inside_an_array_names_the_element(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["limits"]["quantizations"] = ["int8", 8]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "limits.quantizations[1]", "= 8 is an integer", "expected a string")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("cores",), "cores"),
        (("runtimes", "onnx", "intra_op_threads"), "runtimes.onnx.intra_op_threads"),
        (("limits", "max_model_mb"), "limits.max_model_mb"),
    ],
)
def test_bool_is_not_accepted_as_an_integer(tmp_path: Path, path: tuple[str, ...], field: str) -> None:
    doc = valid_doc()
    table = doc
    for key in path[:-1]:
        table = table[key]
    table[path[-1]] = True
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, field, "= true is a boolean", "expected an integer")


def test_onnx_threads_greater_than_cores_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc("raspberry-pi-4")
    doc["runtimes"]["onnx"]["intra_op_threads"] = 9
    error = load_error(write_profile(tmp_path, doc))
    assert str(error) == (
        "raspberry-pi-4.toml: runtimes.onnx.intra_op_threads = 9 is out of range; allowed 1..4 (cores)"
    )
    assert error.field == "runtimes.onnx.intra_op_threads"


@pytest.mark.parametrize(
    ("section", "key"), [("onnx", "inter_op_threads"), ("onnx", "intra_op_threads"), ("tflite", "threads")]
)
def test_any_thread_count_above_cores_or_below_one_is_rejected(
    tmp_path: Path, section: str, key: str
) -> None:
    for bad in (5, 0, -1):
        doc = valid_doc()
        doc["runtimes"][section][key] = bad
        error = load_error(write_profile(tmp_path, doc))
        assert_field(error, f"runtimes.{section}.{key}", f"= {bad} is out of range", "allowed 1..4 (cores)")


@pytest.mark.parametrize(
    ("key", "bad", "allowed"),
    [("cores", 0, "1..256"), ("cores", 257, "1..256"), ("memory_mb", 32, "64..1048576")],
)
def test_hardware_figure_out_of_range_is_rejected(tmp_path: Path, key: str, bad: int, allowed: str) -> None:
    doc = valid_doc()
    doc[key] = bad
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, key, "out of range", f"allowed {allowed}")


def test_memory_budget_greater_than_memory_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["limits"]["agent_memory_budget_mb"] = 4096
    error = load_error(write_profile(tmp_path, doc))
    assert_field(
        error,
        "limits.agent_memory_budget_mb",
        "= 4096 is out of range",
        "allowed 16..2048 (memory_mb)",
    )


def test_memory_budget_below_minimum_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["limits"]["agent_memory_budget_mb"] = 8
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "limits.agent_memory_budget_mb", "allowed 16..2048")


def test_model_limit_larger_than_memory_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["limits"]["max_model_mb"] = 4096
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "limits.max_model_mb", "allowed 1..2048 (memory_mb)")


def test_onnx_providers_not_ending_in_cpu_provider_are_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["onnx"]["execution_providers"] = ["CPUExecutionProvider", "XnnpackExecutionProvider"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.onnx.execution_providers", f'must end with "{CPU_EXECUTION_PROVIDER}"')


def test_empty_onnx_provider_list_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["onnx"]["execution_providers"] = []
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.onnx.execution_providers", "is empty")


def test_miscapitalised_onnx_provider_is_rejected_with_correct_spelling(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["onnx"]["execution_providers"] = ["CudaExecutionProvider", "CPUExecutionProvider"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.onnx.execution_providers[0]", '"CUDAExecutionProvider"')


def test_malformed_onnx_provider_name_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["onnx"]["execution_providers"] = ["cuda", "CPUExecutionProvider"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.onnx.execution_providers[0]", "not an ONNX Runtime provider name")


def test_duplicate_onnx_provider_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["onnx"]["execution_providers"] = ["CPUExecutionProvider", "CPUExecutionProvider"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.onnx.execution_providers", "more than once")


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_runtime_in_order_without_its_section_is_rejected(tmp_path: Path, runtime: str) -> None:
    doc = valid_doc()
    del doc["runtimes"][runtime]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, f"runtimes.{runtime}", "is missing", "runtimes.order")


def test_runtime_section_not_named_in_order_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["order"] = ["onnx"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.tflite", "not in runtimes.order")


def test_duplicate_runtime_in_order_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["order"] = ["onnx", "tflite", "onnx"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.order", '"onnx" more than once')


def test_empty_or_unknown_runtime_order_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["order"] = []
    assert_field(load_error(write_profile(tmp_path, doc)), "runtimes.order", "is empty", "onnx, tflite")
    doc["runtimes"]["order"] = ["onnx", "tensorrt"]
    assert_field(load_error(write_profile(tmp_path, doc)), "runtimes.order[1]", "not allowed", "onnx, tflite")


def test_cpu_delegate_before_an_accelerator_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["tflite"]["delegates"] = ["xnnpack", "edgetpu"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.tflite.delegates", "must come last")


def test_both_cpu_delegate_spellings_are_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["tflite"]["delegates"] = ["edgetpu", "xnnpack", "cpu"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, "runtimes.tflite.delegates", "keep one")


def test_unknown_delegate_is_rejected_with_allowed_values(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["runtimes"]["tflite"]["delegates"] = ["edge-tpu"]
    error = load_error(write_profile(tmp_path, doc))
    assert_field(
        error, "runtimes.tflite.delegates[0]", 'did you mean "edgetpu"', "edgetpu, gpu, xnnpack, cpu"
    )


@pytest.mark.parametrize(
    ("path", "bad", "field", "fragment"),
    [
        (("architecture",), "arm64", "architecture", 'did you mean "aarch64"'),
        (("runtimes", "onnx", "graph_optimization"), "max", "runtimes.onnx.graph_optimization", "extended"),
        (("limits", "quantizations"), ["float32"], "limits.quantizations[0]", 'did you mean "fp32"'),
        (("limits", "quantizations"), [], "limits.quantizations", "is empty"),
        (("limits", "quantizations"), ["int8", "int8"], "limits.quantizations", "more than once"),
    ],
)
def test_value_outside_its_vocabulary_is_rejected(
    tmp_path: Path, path: tuple[str, ...], bad: object, field: str, fragment: str
) -> None:
    doc = valid_doc()
    table = doc
    for key in path[:-1]:
        table = table[key]
    table[path[-1]] = bad
    error = load_error(write_profile(tmp_path, doc))
    assert_field(error, field, fragment)


@pytest.mark.parametrize("bad", ["", "   "])
def test_blank_strings_are_rejected(tmp_path: Path, bad: str) -> None:
    doc = valid_doc()
    doc["display_name"] = bad
    assert_field(load_error(write_profile(tmp_path, doc)), "display_name", "blank")
    doc = valid_doc()
    doc["source"] = ["https://example.com", bad]
    assert_field(load_error(write_profile(tmp_path, doc)), "source[1]", "blank")


def test_empty_source_list_is_rejected(tmp_path: Path) -> None:
    doc = valid_doc()
    doc["source"] = []
    assert_field(load_error(write_profile(tmp_path, doc)), "source", "is empty")


def test_bad_toml_syntax_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "test-board.toml"
    path.write_text('name = "test-board"\ncores = = 4\n', encoding="utf-8")
    error = load_error(path)
    assert error.field == ""
    assert "invalid TOML" in str(error)
    assert "line 2, column" in str(error)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "test-board.toml"
    path.write_bytes(b'name = "\xff"\n')
    error = load_error(path)
    assert error.field == ""
    assert "UTF-8" in str(error)


def test_name_not_matching_file_stem_is_rejected(tmp_path: Path) -> None:
    path = write_profile(tmp_path, valid_doc("raspberry-pi-5"), stem="raspberry-pi-4")
    error = load_error(path)
    assert_field(error, "name", '"raspberry-pi-5"', 'file stem "raspberry-pi-4"')


@pytest.mark.parametrize("bad", ["Raspberry-Pi", "-board", "board_1", "board.x"])
def test_name_outside_the_allowed_pattern_is_rejected(bad: str) -> None:
    doc = valid_doc(bad)
    with pytest.raises(ProfileError) as caught:
        parse_profile(to_toml(doc), source_name="in-memory")
    assert_field(caught.value, "name", "not a valid profile name", "[a-z0-9][a-z0-9-]*")
    assert str(caught.value).startswith("in-memory: ")
    assert caught.value.path is None


def test_unreadable_profile_path_is_a_profile_error(tmp_path: Path) -> None:
    error = load_error(tmp_path / "missing-board.toml")
    assert error.field == ""
    assert "cannot read" in str(error)


def test_invalid_file_stops_load_profiles_naming_that_file(tmp_path: Path) -> None:
    write_profile(tmp_path, valid_doc("board-a"))
    doc = valid_doc("board-b")
    doc["cores"] = "four"
    bad = write_profile(tmp_path, doc)
    with pytest.raises(ProfileError) as caught:
        load_profiles(tmp_path)
    assert caught.value.path == str(bad)
    assert_field(caught.value, "cores")
    assert str(caught.value).startswith("board-b.toml: ")


def test_missing_profile_directory_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not a directory"):
        load_profiles(tmp_path / "nope")
    with pytest.raises(ProfileError, match="not a directory"):
        resolve_profile("board-a", tmp_path / "nope")


def test_unknown_profile_name_lists_available_profiles(tmp_path: Path) -> None:
    write_profile(tmp_path, valid_doc("board-a"))
    write_profile(tmp_path, valid_doc("board-b"))
    with pytest.raises(UnknownProfileError) as caught:
        resolve_profile("board-c", tmp_path)
    error = caught.value
    assert isinstance(error, ProfileError)
    assert error.available == ("board-a", "board-b")
    assert "board-a, board-b" in str(error)
    assert "'board-c'" in str(error)


def test_unknown_builtin_profile_suggests_the_closest_name() -> None:
    with pytest.raises(UnknownProfileError) as caught:
        resolve_profile("raspbery-pi-4")
    assert "did you mean 'raspberry-pi-4'" in str(caught.value)
    assert set(REQUIRED_PROFILES) <= set(caught.value.available)


@pytest.mark.parametrize("name", ["../firmware_profiles/raspberry-pi-4", "raspberry-pi-4.toml", ""])
def test_profile_name_cannot_address_other_files(name: str) -> None:
    with pytest.raises(UnknownProfileError):
        resolve_profile(name, FIRMWARE_DIR)


def test_one_broken_profile_does_not_block_resolving_another(tmp_path: Path) -> None:
    write_profile(tmp_path, valid_doc("board-a"))
    (tmp_path / "board-b.toml").write_text("not toml [", encoding="utf-8")
    assert resolve_profile("board-a", tmp_path).name == "board-a"


def test_profile_errors_survive_pickling() -> None:
    unknown = UnknownProfileError("x", ["b", "a"], path="/profiles")
    copy_unknown = pickle.loads(pickle.dumps(unknown))
    assert (str(copy_unknown), copy_unknown.available, copy_unknown.path) == (
        str(unknown),
        ("a", "b"),
        "/profiles",
    )
    plain = ProfileError("f.toml: cores is missing", path="/f.toml", field="cores")
    copy_plain = pickle.loads(pickle.dumps(plain))
    assert (str(copy_plain), copy_plain.path, copy_plain.field) == (str(plain), "/f.toml", "cores")


# --------------------------------------------------------------------------------------------------
# builtin_profiles_dir: installed wheel vs source checkout vs broken install
# --------------------------------------------------------------------------------------------------


def test_builtin_dir_prefers_wheel_copy_then_checkout_then_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "agent" / "profiles"
    package.mkdir(parents=True)
    monkeypatch.setattr(loader_module, "__file__", str(package / "_loader.py"))

    with pytest.raises(ProfileError, match="no built-in firmware profiles found"):
        builtin_profiles_dir()

    checkout = tmp_path / "site" / "firmware_profiles"
    checkout.mkdir()
    assert builtin_profiles_dir() == checkout

    installed = package / "builtin"
    installed.mkdir()
    assert builtin_profiles_dir() == installed


# --------------------------------------------------------------------------------------------------
# Properties: whatever the input, the loader fails only with ProfileError
# --------------------------------------------------------------------------------------------------

_TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
_TOML_VALUES = st.one_of(_TOML_SCALARS, st.lists(_TOML_SCALARS, max_size=4))
_LEAF_PATHS = [(key,) for key in valid_doc() if not isinstance(valid_doc()[key], dict)] + [
    ("runtimes", "order"),
    *[("runtimes", "onnx", key) for key in valid_doc()["runtimes"]["onnx"]],
    *[("runtimes", "tflite", key) for key in valid_doc()["runtimes"]["tflite"]],
    *[("limits", key) for key in valid_doc()["limits"]],
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.sampled_from("ab=[]{}\"'.,#\n 019-_tfx"), max_size=120))
def test_arbitrary_text_fails_only_with_profile_error(text: str) -> None:
    try:
        parse_profile(text, source_name="fuzz.toml")
    except ProfileError as error:
        assert str(error).startswith("fuzz.toml: ")


@settings(max_examples=300)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(_LEAF_PATHS), st.one_of(st.none(), _TOML_VALUES)), min_size=1, max_size=3
    )
)
def test_mutated_valid_profile_parses_or_names_a_field(edits: list[tuple[tuple[str, ...], object]]) -> None:
    doc = copy.deepcopy(valid_doc())
    for path, value in edits:
        table = doc
        for key in path[:-1]:
            table = table[key]
        if value is None:
            table.pop(path[-1], None)  # None means "delete the key"
        else:
            table[path[-1]] = value
    text = to_toml(doc)
    assert tomllib.loads(text) == doc  # the test's writer produced what it meant to
    try:
        profile = parse_profile(text, source_name="test-board.toml")
    except ProfileError as error:
        assert error.field, str(error)  # a well-formed TOML file's problem is always some field
        assert str(error).startswith(f"test-board.toml: {error.field} ")
    else:
        assert profile.architecture in ARCHITECTURES
        assert profile.onnx is None or profile.onnx.intra_op_threads <= profile.cores
        assert profile.limits.agent_memory_budget_bytes <= profile.memory_mb * MIB
