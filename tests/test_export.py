"""Export through the public API: parity gate, refusals, nothing partial."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import BundleError, ConfigError, ExportError, ValidationFailedError

from .conftest import EXAMPLE

torch = pytest.importorskip("torch")

from edgescope.export import ExportRequest, export_model  # noqa: E402


def _request(out: Path, **changes: object) -> ExportRequest:
    request = ExportRequest(
        name="lesion-unet",
        output=out,
        factory=str(EXAMPLE / "model.py") + ":build",
        weights=EXAMPLE / "weights.pt",
        samples=3,
    )
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def _quiet(_line: str) -> None:
    pass


def test_example_bundle_passes_the_gate_and_records_it(example_bundle: Bundle) -> None:
    manifest = example_bundle.manifest
    report = manifest.validation
    assert report.passed and not report.forced
    metrics = {m.name: m for m in report.metrics}
    assert metrics["max_abs_error"].value <= 1e-3
    assert metrics["dice_min"].value >= 0.99
    assert manifest.versions.torch == torch.__version__
    assert manifest.source_sha256  # the weights it came from
    assert {e.path for e in manifest.files} == {"golden.npz", "model.onnx"}
    graph_input = onnx.load(str(example_bundle.onnx_path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_runs_a_dynamic_batch(example_bundle: Bundle) -> None:
    session = ort.InferenceSession(str(example_bundle.onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": np.random.default_rng(0).random((3, 1, 256, 256), dtype=np.float32)})
    assert out.shape == (3, 1, 256, 256)


def test_failing_gate_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(ValidationFailedError, match="nothing was written"):
        export_model(_request(out, limits={"min_dice": 1.5}), log=_quiet)
    assert list(tmp_path.iterdir()) == []


def test_forced_bundle_is_marked_failed_and_not_served_by_default(tmp_path: Path) -> None:
    from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgescope.runtime.server.registry import ModelRegistry
    from edgescope.runtime.server.repository import BundlePolicy

    out = tmp_path / "b"
    bundle = export_model(_request(out, limits={"min_dice": 1.5}, force=True), log=_quiet)
    assert not bundle.manifest.validation.passed and bundle.manifest.validation.forced
    strict = ModelRegistry(OnnxRuntimeBackend())
    with pytest.raises(BundleError, match="accuracy gate"):
        strict.load(out)
    strict.close()
    lenient = ModelRegistry(OnnxRuntimeBackend(), policy=BundlePolicy(allow_failed_validation=True))
    model = lenient.load(out)
    assert model.provenance.failed_validation  # every result it gives says so
    lenient.close()


def test_corrupt_weights_give_a_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot load weights"):
        export_model(_request(tmp_path / "b", weights=weights), log=_quiet)
    assert not (tmp_path / "b").exists()


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    with pytest.raises(ExportError, match="do not fit"):
        export_model(_request(tmp_path / "b", weights=weights), log=_quiet)


def test_torchscript_input(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_model", EXAMPLE / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    model.load_state_dict(torch.load(EXAMPLE / "weights.pt", weights_only=True))
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch but still what many teams hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.trace(model.eval(), torch.zeros(1, 1, 256, 256))
    path = tmp_path / "model.ts"
    scripted.save(str(path))
    bundle = export_model(_request(tmp_path / "b", factory=None, weights=None, torchscript=path), log=_quiet)
    assert bundle.manifest.validation.passed


@pytest.mark.parametrize(("field", "value"), [("precision", "int4"), ("task", "poetry"), ("color", "cmyk")])
def test_unsupported_choices_are_refused_by_name(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=value):
        export_model(_request(tmp_path / "b", **{field: value}), log=_quiet)


def test_bad_factory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no attribute"):
        export_model(_request(tmp_path / "b", factory=str(EXAMPLE / "model.py") + ":missing"), log=_quiet)


def test_output_specs_keep_the_graph_element_type() -> None:
    from edgescope.export.api import _output_spec
    from edgescope.v1 import manifest_pb2

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ArgMax", ["x"], ["label"], axis=1)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])],
        [onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["batch", 1])],
    )
    spec = _output_spec(onnx.helper.make_model(graph), "label")
    assert spec.dtype == manifest_pb2.DATA_TYPE_INT64
    assert [d.WhichOneof("kind") for d in spec.shape] == ["symbol", "size"]
