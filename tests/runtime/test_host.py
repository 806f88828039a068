"""The model host with the real runtimes (ONNX Runtime, LiteRT) and the real int8 demo models."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.demo import MODELS_DIR
from agent.model import RequestError
from agent.runtime import ModelHost, ModelLoadError, ModelSpec, UnknownModelError, load_schema_file
from tests.conftest import profile, samples

MODELS = [("cancer_mlp_int8", ".onnx"), ("digits_mlp_int8", ".onnx"), ("digits_int8", ".tflite")]


def spec(stem: str, suffix: str, directory: Path = MODELS_DIR) -> ModelSpec:
    return ModelSpec(directory / f"{stem}{suffix}", load_schema_file(MODELS_DIR / f"{stem}.schema.json"))


@pytest.fixture(scope="module")
def host() -> ModelHost:
    h = ModelHost(profile("generic-x86-64"))
    for stem, suffix in MODELS:
        h.load(spec(stem, suffix))
    return h


@pytest.mark.parametrize(("stem", "suffix"), MODELS)
def test_real_quantized_model_predicts_held_out_rows(host: ModelHost, stem: str, suffix: str) -> None:
    s = samples(stem)
    (name, rows), = s["inputs"].items()
    model = s["model"]
    dtype = host.get(model).checker.dtype_of(name)
    preds = [int(np.argmax(host.infer(model, {name: np.asarray([r], dtype=dtype)}).outputs[
        host.get(model).schema.outputs[0].name])) for r in rows]
    assert preds == s["expected_top1"]  # the runtime really ran the int8 model
    assert np.mean(np.array(preds) == np.array(s["labels"])) >= 0.8


@pytest.mark.parametrize(("stem", "suffix"), MODELS)
def test_batched_call_equals_single_calls(host: ModelHost, stem: str, suffix: str) -> None:
    s = samples(stem)
    (name, rows), = s["inputs"].items()
    model = host.get(s["model"])
    x = np.asarray(rows[:5], dtype=model.checker.dtype_of(name))
    out_name = model.schema.outputs[0].name
    whole = host.infer(model.name, {name: x}).outputs[out_name]
    single = np.concatenate([host.infer(model.name, {name: x[i : i + 1]}).outputs[out_name] for i in range(5)])
    np.testing.assert_allclose(whole, single, atol=1e-6)


def test_quantized_models_really_are_int8() -> None:
    import onnx

    for stem in ("cancer_mlp_int8", "digits_mlp_int8"):
        m = onnx.load(str(MODELS_DIR / f"{stem}.onnx"))
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        int8_inits = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert int8_inits, f"{stem} has no int8 weights"
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(MODELS_DIR / "digits_int8.tflite"))
    kinds = {d["dtype"] for d in interp.get_tensor_details()}
    assert np.int8 in kinds


def test_wrong_dtype_and_shape_counted_and_named(host: ModelHost) -> None:
    m = host.get("cancer-mlp")
    before = m.stats.errors["dtype_mismatch"], m.stats.errors["shape_mismatch"]
    with pytest.raises(RequestError, match="features") as e1:
        host.infer("cancer-mlp", {"features": np.zeros((1, 30), dtype=np.float64)})
    with pytest.raises(RequestError, match=r"expects \[N, 30\]") as e2:
        host.infer("cancer-mlp", {"features": np.zeros((1, 29), dtype=np.float32)})
    assert (e1.value.code, e2.value.code) == ("dtype_mismatch", "shape_mismatch")
    assert (m.stats.errors["dtype_mismatch"], m.stats.errors["shape_mismatch"]) == (before[0] + 1, before[1] + 1)


def test_nan_rejected_and_out_of_range_served_and_counted(host: ModelHost) -> None:
    s = samples("cancer_mlp_int8")
    row = np.asarray([s["inputs"]["features"][0]], dtype=np.float32)
    bad = row.copy()
    bad[0, 2] = np.nan
    with pytest.raises(RequestError) as err:
        host.infer("cancer-mlp", {"features": bad})
    assert err.value.code == "non_finite"
    far = row.copy()
    far[0, 0] = 1e6
    res = host.infer("cancer-mlp", {"features": far})
    assert res.flags is not None and res.flags.out_of_range == ("mean radius",)
    assert host.get("cancer-mlp").stats.served_out_of_range["mean radius"] >= 1


def test_unknown_model_named(host: ModelHost) -> None:
    with pytest.raises(UnknownModelError, match=r"no-such.*loaded: cancer-mlp, digits-mlp, digits-tflite"):
        host.infer("no-such", {})


def test_missing_model_file_refused(tmp_path: Path) -> None:
    h = ModelHost(profile())
    with pytest.raises(ModelLoadError, match="missing or unreadable"):
        h.load(spec("cancer_mlp_int8", ".onnx", tmp_path))


@pytest.mark.parametrize(("stem", "suffix"), [("cancer_mlp_int8", ".onnx"), ("digits_int8", ".tflite")])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_model_file_refused(tmp_path: Path, stem: str, suffix: str, damage: str) -> None:
    data = (MODELS_DIR / f"{stem}{suffix}").read_bytes()
    broken = {"truncate": data[: len(data) // 3], "garbage": bytes(range(256)) * 40, "empty": b""}[damage]
    (tmp_path / f"{stem}{suffix}").write_bytes(broken)
    h = ModelHost(profile())
    with pytest.raises(ModelLoadError):
        h.load(spec(stem, suffix, tmp_path))
    assert h.models() == []


def test_schema_disagreeing_with_model_refused(tmp_path: Path) -> None:
    shutil.copy(MODELS_DIR / "cancer_mlp_int8.onnx", tmp_path / "cancer_mlp_int8.onnx")
    s = load_schema_file(MODELS_DIR / "digits_mlp_int8.schema.json")  # 64 features vs the model's 30
    with pytest.raises(ModelLoadError, match="shape"):
        ModelHost(profile()).load(ModelSpec(tmp_path / "cancer_mlp_int8.onnx", s))


def test_model_over_profile_size_limit_refused() -> None:
    p = profile()
    small = type(p.limits)(**{**{f: getattr(p.limits, f) for f in p.limits.__dataclass_fields__},
                              "max_model_bytes": 1000})
    h = ModelHost(type(p)(**{**{f: getattr(p, f) for f in p.__dataclass_fields__}, "limits": small}))
    with pytest.raises(ModelLoadError, match="allows at most 1000 bytes"):
        h.load(spec("digits_mlp_int8", ".onnx"))


def test_memory_budget_refuses_model_that_does_not_fit() -> None:
    used = [200 << 20]
    h = ModelHost(profile("raspberry-pi-4"), rss=lambda: used[0])
    budget = h.profile.limits.agent_memory_budget_bytes
    h.load(spec("cancer_mlp_int8", ".onnx"))
    used[0] = budget - 1000  # the process is now nearly at its budget
    with pytest.raises(ModelLoadError, match="memory budget"):
        h.load(spec("digits_mlp_int8", ".onnx"))
    assert [m.name for m in h.models()] == ["cancer-mlp"]


def test_runtime_not_in_profile_refused() -> None:
    p = profile()
    only_onnx = type(p)(**{**{f: getattr(p, f) for f in p.__dataclass_fields__}, "runtime_order": ("onnx",),
                           "tflite": None})
    with pytest.raises(ModelLoadError, match="needs runtime 'tflite'"):
        ModelHost(only_onnx).load(spec("digits_int8", ".tflite"))


def test_jetson_profile_falls_back_from_tensorrt_and_cuda_to_cpu() -> None:
    m = ModelHost(profile("jetson-orin-nano")).load(spec("cancer_mlp_int8", ".onnx"))
    assert m.backend.accelerator == "CPUExecutionProvider"
    wanted = [f.wanted for f in m.backend.fallbacks]
    assert wanted == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert all("not available" in f.reason for f in m.backend.fallbacks)


def test_coral_profile_falls_back_from_edgetpu_delegate_to_cpu() -> None:
    # The test process's own RSS grows over a long run; the budget is not what this test is about.
    m = ModelHost(profile("coral-dev-board"), rss=lambda: 64 << 20).load(spec("digits_int8", ".tflite"))
    assert m.backend.accelerator == "cpu"
    assert [f.wanted for f in m.backend.fallbacks] == ["edgetpu"]
    assert "libedgetpu.so.1" in m.backend.fallbacks[0].reason
    s = samples("digits_int8")
    out = m.infer({"features": np.asarray(s["inputs"]["features"][:1], dtype=np.float32)})
    assert int(np.argmax(out.outputs[m.schema.outputs[0].name])) == s["expected_top1"][0]


def test_swap_loads_new_version_before_switching(host: ModelHost) -> None:
    h = ModelHost(profile())
    h.load(spec("cancer_mlp_int8", ".onnx"))
    x = np.asarray(samples("cancer_mlp_int8")["inputs"]["features"][:1], dtype=np.float32)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                h.infer("cancer-mlp", {"features": x})
            except BaseException as exc:
                failures.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(5):
        h.swap(spec("cancer_mlp_int8", ".onnx"))
    stop.set()
    t.join()
    assert failures == []
