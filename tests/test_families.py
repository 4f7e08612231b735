"""Every model family: exported, through the FP32 gate, served over gRPC with its result type;
recurrent state and the previous frame carried per stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import ExportError, FrameError
from edgescope.runtime.backends.base import Feed, Outputs
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.evaluation.metrics import RAW_ERROR_METRICS
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.encode import decode_mask, decode_tensor
from edgescope.runtime.pipeline.postprocess import postprocess
from edgescope.runtime.pipeline.preprocess import Geometry, preprocess
from edgescope.runtime.pipeline.state import StreamState, StreamStates, is_stateful
from edgescope.runtime.pipeline.tasks.registration import frame_displacement, postprocess_registration
from edgescope.runtime.server.registry import ModelRegistry, ServedModel, WorkerOptions
from edgescope.runtime.server.stages import FramePixels, frame_jobs, job_for
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.runtime.transport import channel_options
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ROOT, ServerThread

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from edgescope.export import ExportRequest, export_model  # noqa: E402
from edgescope.export.loading import load_model  # noqa: E402
from edgescope.export.tasks import StateSpec  # noqa: E402

FACTORIES = str(ROOT / "examples" / "families" / "models.py") + ":"
VIEWS = ["A4C", "PLAX", "PSAX"]
# name -> ExportRequest fields; every model takes a 64x64 gray frame unless it says otherwise.
FAMILIES: dict[str, dict[str, Any]] = {
    "unet": {"factory": "build_unet", "activation": "softmax"},
    "attention-unet": {"factory": "build_attention_unet", "activation": "softmax"},
    "segresnet": {"factory": "build_segresnet", "activation": "softmax"},
    "unetr": {"factory": "build_unetr", "activation": "softmax"},
    "resnet": {
        "factory": "build_resnet_classifier",
        "task": "classification",
        "activation": "softmax",
        "labels": VIEWS,
    },
    "vit": {"factory": "build_vit_classifier", "task": "classification", "activation": "softmax", "labels": VIEWS},
    "detector": {
        "factory": "build_detector",
        "task": "detection",
        "output_name": "boxes",
        "labels": ["lesion", "instrument"],
        # Untrained, its scores sit just under 0.5; this keeps some boxes for NMS to thin out.
        "score_threshold": 0.47,
        "input_height": 96,
        "input_width": 96,
        "resize": "letterbox",
    },
    "tracker": {"factory": "build_tracker", "state": [StateSpec("hidden", "hidden_out", (8, 16, 16))]},
    "autoencoder": {"factory": "build_autoencoder", "task": "anomaly", "output_name": "anomaly_map", "labels": []},
    "super-resolution": {"factory": "build_super_resolution", "task": "image", "output_name": "enhanced", "labels": []},
    "registration": {
        "factory": "build_registration",
        "task": "registration",
        "output_name": "displacement",
        "previous_frame_input": "previous",
        "labels": [],
    },
}
FRAME_SHAPE = (120, 160)


def export_family(name: str, out: Path) -> Bundle:
    fields = {"input_height": 64, "input_width": 64, "samples": 3, **FAMILIES[name]}
    fields["factory"] = FACTORIES + fields["factory"]
    return export_model(ExportRequest(name=name, output=out / name, **fields), log=lambda _line: None)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    out = tmp_path_factory.mktemp("families")
    return {name: export_family(name, out) for name in FAMILIES}


@pytest.fixture(scope="module")
def family_server(bundles: dict[str, Bundle]) -> Iterator[ServerThread]:
    # Two instances per model: a stream's frames may be inferred two at a time, except where state
    # carries over from frame to frame (the stateful tests below check the order held).
    running = ServerThread([b.path for b in bundles.values()], models=WorkerOptions(instances=2))
    try:
        yield running
    finally:
        running.stop()


def frames(count: int) -> list[np.ndarray]:
    source = SyntheticUltrasoundSource(seed=5, n_frames=count, height=FRAME_SHAPE[0], width=FRAME_SHAPE[1])
    return [f.pixels for f in source]


def frame_message(pixels: np.ndarray, model: str, seq: int = 0, **fields: Any) -> stream_pb2.Frame:
    spacing = stream_pb2.PixelSpacing(row_mm=0.2, column_mm=0.25)
    return stream_pb2.Frame(stream_id="s", seq=seq, model=model, raw=encode_raw(pixels), spacing=spacing, **fields)


def infer(server: ServerThread, frame: stream_pb2.Frame) -> stream_pb2.Result:
    with grpc.insecure_channel(server.target, options=channel_options(64 << 20)) as channel:
        return stream_pb2_grpc.StreamServiceStub(channel).Infer(frame, timeout=30)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_passes_the_fp32_gate(bundles: dict[str, Bundle], name: str) -> None:
    report = bundles[name].manifest.validation
    assert report.passed, [(m.name, m.value) for m in report.metrics if not m.passed]
    task_metrics = {m.name for m in report.metrics} - RAW_ERROR_METRICS
    expected = {
        manifest_pb2.TASK_SEGMENTATION: {"dice_min", "dice_mean", "iou_min"},
        manifest_pb2.TASK_CLASSIFICATION: {"top1_agreement", "max_probability_diff"},
        manifest_pb2.TASK_DETECTION: {"box_match", "box_iou_mean"},
        manifest_pb2.TASK_IMAGE: {"psnr_min_db", "ssim_min"},
        manifest_pb2.TASK_ANOMALY: {"score_max_diff", "decision_agreement"},
        manifest_pb2.TASK_REGISTRATION: set(),
    }[bundles[name].manifest.task]
    assert task_metrics == expected


def _outputs(result: stream_pb2.Result) -> dict[str, stream_pb2.Output]:
    assert result.status.code == stream_pb2.FRAME_STATUS_CODE_OK, result.status.reason
    return {o.name: o for o in result.outputs}


@pytest.mark.parametrize("name", ["unet", "attention-unet", "segresnet", "unetr", "tracker"])
def test_segmenters_answer_a_mask_on_the_frame_grid(family_server: ServerThread, name: str) -> None:
    mask = decode_mask(_outputs(infer(family_server, frame_message(frames(1)[0], name)))["mask"].mask)
    assert mask.shape == FRAME_SHAPE


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_classifiers_answer_probabilities_per_label(family_server: ServerThread, name: str) -> None:
    classes = _outputs(infer(family_server, frame_message(frames(1)[0], name)))["classes"].classes
    assert list(classes.labels) == VIEWS
    assert sum(classes.scores) == pytest.approx(1.0, abs=1e-5)


def test_detector_answers_boxes_inside_the_frame(family_server: ServerThread) -> None:
    result = infer(family_server, frame_message(frames(1)[0], "detector"))
    boxes = list(_outputs(result)["boxes"].boxes.boxes)
    assert boxes, "the seeded detector finds boxes above its score threshold"
    assert len(boxes) <= 100
    for box in boxes:
        assert 0 <= box.x_min <= box.x_max <= FRAME_SHAPE[1]
        assert 0 <= box.y_min <= box.y_max <= FRAME_SHAPE[0]
        assert box.score >= 0.47
        assert box.label in ("lesion", "instrument")
    assert {q.name: q.value for q in result.quantities}["detections"] == len(boxes)


def test_autoencoder_answers_a_score_and_a_heat_map(family_server: ServerThread) -> None:
    result = infer(family_server, frame_message(frames(1)[0], "autoencoder"))
    heat = _outputs(result)["heatmap"].image
    assert heat.encoding == stream_pb2.ENCODING_PNG
    image = cv2.imdecode(np.frombuffer(heat.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == FRAME_SHAPE
    quantities = {q.name: q for q in result.quantities}
    assert quantities["anomaly_score"].value > 0
    assert quantities["anomalous"].value in (0.0, 1.0)


def test_super_resolution_answers_an_image_at_twice_the_frame_size(family_server: ServerThread) -> None:
    image = _outputs(infer(family_server, frame_message(frames(1)[0], "super-resolution")))["image"].image
    decoded = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (FRAME_SHAPE[0] * 2, FRAME_SHAPE[1] * 2)


def test_registration_answers_a_displacement_field_in_frame_pixels(family_server: ServerThread) -> None:
    result = infer(family_server, frame_message(frames(1)[0], "registration"))
    field = decode_tensor(_outputs(result)["displacement_px"].tensor)
    assert field.shape == (2, *FRAME_SHAPE)
    assert {q.unit for q in result.quantities} == {"px"}


def _stream(server: ServerThread, messages: list[stream_pb2.Frame]) -> list[stream_pb2.Result]:
    with grpc.insecure_channel(server.target, options=channel_options(64 << 20)) as channel:
        return list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(messages), timeout=60))


def test_stateless_families_stream_over_the_server(family_server: ServerThread) -> None:
    pixels = frames(3)
    for name in ("unet", "resnet", "detector", "autoencoder"):
        results = _stream(
            family_server, [frame_message(p, name if i == 0 else "", seq=i) for i, p in enumerate(pixels)]
        )
        assert [r.seq for r in results] == [0, 1, 2]
        assert all(r.status.code == stream_pb2.FRAME_STATUS_CODE_OK for r in results), name


def test_stateful_families_carry_state_over_the_server(family_server: ServerThread, bundles: dict[str, Bundle]) -> None:
    pixels = frames(3)
    # Two interleaved streams of the same tracker: each must keep its own state.
    results = {
        key: _stream(
            family_server,
            [frame_message(p, "registration" if key == "r" else "tracker", seq=i) for i, p in enumerate(seq_pixels)],
        )
        for key, seq_pixels in (("a", pixels), ("b", pixels[::-1]), ("r", pixels))
    }
    for answers in results.values():
        assert [r.status.code for r in answers] == [stream_pb2.FRAME_STATUS_CODE_OK] * 3
    # The server's answers equal running the model with state carried frame by frame.
    registry = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1))
    try:
        for key, name, seq_pixels in (
            ("a", "tracker", pixels),
            ("b", "tracker", pixels[::-1]),
            ("r", "registration", pixels),
        ):
            model = registry.load(bundles[name].path)
            carried = StreamStates().for_stream(key)
            expected = [run_model(model, frame_message(p, name, seq=i), carried) for i, p in enumerate(seq_pixels)]
            for got, want in zip(results[key], expected, strict=True):
                assert got.outputs == want.outputs, (key, got.seq)
            registry.unload(name)
    finally:
        registry.close()


# --- Recurrent state and the previous frame, carried per stream ------------------------


def run_model(model: ServedModel, frame: stream_pb2.Frame, stream: StreamState | None = None) -> stream_pb2.Result:
    """One frame through the stages and the model's worker, as a stream runs it."""

    async def run() -> stream_pb2.Result:
        (job,) = frame_jobs(frame, [model], FramePixels(frame), time.perf_counter_ns(), want_thumbnail=False)
        finished = await model.worker.infer(job_for(job, "test", stream or StreamState(), frame.reset_state))
        return finished.result

    return asyncio.run(run())


@pytest.fixture(scope="module")
def loaded(bundles: dict[str, Bundle]) -> Iterator[dict[str, ServedModel]]:
    registry = ModelRegistry(OnnxRuntimeBackend(intra_op_threads=1))
    yield {name: registry.load(bundles[name].path) for name in ("tracker", "registration")}
    registry.close()


def test_manifest_declares_state_and_roles(bundles: dict[str, Bundle]) -> None:
    tracker = bundles["tracker"].manifest
    assert [(s.input, s.output, list(s.shape)) for s in tracker.state] == [("hidden", "hidden_out", [8, 16, 16])]
    assert [i.name for i in tracker.inputs] == ["image", "hidden"]
    assert [o.name for o in tracker.outputs] == ["logits", "hidden_out"]
    registration = bundles["registration"].manifest
    assert {b.input: b.role for b in registration.input_bindings} == {"image": 1, "previous": 2}
    assert is_stateful(tracker) and is_stateful(registration)


def test_tracker_state_is_separate_per_stream_and_reset_restarts_it(loaded: dict[str, ServedModel]) -> None:
    model, states = loaded["tracker"], StreamStates()
    pixels = frames(4)
    a, b = states.for_stream("a"), states.for_stream("b")
    state_a = a.for_model(model.name, model.manifest)
    for i, p in enumerate(pixels):
        run_model(model, frame_message(p, "tracker", seq=i), a)
    hidden_after_a = state_a.feed(np.zeros((1, 1, 64, 64), np.float32))["hidden"].copy()
    # Stream b saw only the last frame: its state differs from a's.
    run_model(model, frame_message(pixels[-1], "tracker"), b)
    hidden_b = b.for_model(model.name, model.manifest).feed(np.zeros((1, 1, 64, 64), np.float32))["hidden"]
    assert not np.allclose(hidden_after_a, hidden_b)
    assert np.abs(hidden_after_a).max() > 0
    # Resetting stream a and showing it the last frame gives exactly b's state.
    run_model(model, frame_message(pixels[-1], "tracker", reset_state=True), a)
    np.testing.assert_array_equal(state_a.feed(np.zeros((1, 1, 64, 64), np.float32))["hidden"], hidden_b)
    states.drop("a")
    assert len(states) == 1


def test_registration_feeds_the_previous_frame(loaded: dict[str, ServedModel], bundles: dict[str, Bundle]) -> None:
    model, states = loaded["registration"], StreamStates()
    first, second = frames(2)
    stream = states.for_stream("s")
    run_model(model, frame_message(first, "registration"), stream)
    result = run_model(model, frame_message(second, "registration", seq=1), stream)
    field = decode_tensor(result.outputs[0].tensor)
    # The same pair fed straight to ONNX Runtime, mapped to the frame the same way.
    spec = model.manifest.preprocessing
    session = ort.InferenceSession(str(bundles["registration"].onnx_path), providers=["CPUExecutionProvider"])
    moving, geometry = preprocess(second, spec)
    fixed, _ = preprocess(first, spec)
    (raw,) = session.run(None, {"image": moving, "previous": fixed})
    np.testing.assert_allclose(field, frame_displacement(raw, geometry, spec.height), atol=1e-5)
    # Without stream state the frame is its own predecessor: another answer.
    alone = decode_tensor(run_model(model, frame_message(second, "registration")).outputs[0].tensor)
    assert not np.allclose(alone, field)


def test_displacement_in_mm_needs_spacing() -> None:
    manifest = manifest_pb2.ModelManifest(task=manifest_pb2.TASK_REGISTRATION)
    manifest.preprocessing.height = manifest.preprocessing.width = 4
    manifest.postprocessing.output = "d"
    manifest.postprocessing.registration.units = manifest_pb2.DISPLACEMENT_UNITS_MILLIMETERS
    field = np.ones((1, 2, 4, 4), np.float32)
    geometry = Geometry(8, 8, 0, 0, 4, 4)
    with pytest.raises(FrameError, match="pixel spacing"):
        postprocess_registration({"d": field}, manifest, geometry, [])
    spacing = stream_pb2.PixelSpacing(row_mm=0.5, column_mm=0.25)
    result = postprocess({"d": field}, manifest, geometry, spacing)
    # One model pixel is two frame pixels: 2 px * 0.5 mm along rows, 2 px * 0.25 mm along columns.
    np.testing.assert_allclose(result.tensors["displacement_mm"][0], 1.0)
    np.testing.assert_allclose(result.tensors["displacement_mm"][1], 0.5)
    # Two calibrated regions with their own spacing; the rows between them have none (NaN, not measured).
    regions = [
        stream_pb2.CalibratedRegion(name="top", x_max=7, y_max=2, row_mm=0.5, column_mm=0.25),
        stream_pb2.CalibratedRegion(name="bottom", y_min=5, x_max=7, y_max=7, row_mm=1.0, column_mm=1.0),
    ]
    result = postprocess({"d": field}, manifest, geometry, spacing, regions)
    rows = result.tensors["displacement_mm"][0]
    np.testing.assert_allclose(rows[:3], 1.0)
    np.testing.assert_allclose(rows[5:], 2.0)
    assert np.isnan(rows[3:5]).all()
    by_region = {(q.region, q.name): q for q in result.quantities}
    assert by_region[("bottom", "displacement_max")].value == pytest.approx(np.hypot(2.0, 2.0))
    assert by_region[("top", "displacement_max")].pixels == 24
    assert by_region[("top", "displacement_max")].pixels_outside == 16


def test_a_torch_export_program_exports_and_passes_the_gate(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    model = load_model(FACTORIES + "build_super_resolution", None, None)
    program = torch.export.export(model, (torch.rand(2, 1, 64, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "sr.pt2")
    bundle = export_model(
        ExportRequest(
            name="sr-pt2",
            output=tmp_path / "bundle",
            exported_program=tmp_path / "sr.pt2",
            task="image",
            output_name="enhanced",
            labels=[],
            input_height=64,
            input_width=64,
            samples=2,
        ),
        log=lambda _line: None,
    )
    assert bundle.manifest.validation.passed
    assert bundle.manifest.source_sha256


def test_a_torch_export_program_with_a_fixed_batch_is_refused(tmp_path: Path) -> None:
    model = load_model(FACTORIES + "build_super_resolution", None, None)
    program = torch.export.export(model, (torch.rand(1, 1, 64, 64),))
    torch.export.save(program, tmp_path / "fixed.pt2")
    with pytest.raises(ExportError, match="fixed batch size"):
        load_model(None, None, None, tmp_path / "fixed.pt2")


@pytest.mark.parametrize("name", ["tracker", "detector", "autoencoder"])
def test_validate_reruns_the_gate_for_stateful_multi_output_and_wrapped_models(
    bundles: dict[str, Bundle], name: str, tmp_path: Path
) -> None:
    import shutil

    from edgescope.export.validate import ValidateRequest, validate_bundle

    copy = tmp_path / name
    shutil.copytree(bundles[name].path, copy)
    factory = FACTORIES + FAMILIES[name]["factory"]
    validated = validate_bundle(ValidateRequest(bundle=copy, factory=factory, samples=3), log=lambda _line: None)
    assert validated.manifest.validation.passed
    assert {m.name for m in validated.manifest.validation.metrics} == {
        m.name for m in bundles[name].manifest.validation.metrics
    }


def test_a_stateful_model_self_tests_its_golden_frames_as_a_sequence(bundles: dict[str, Bundle]) -> None:
    from edgescope.runtime.evaluation import onnxruntime_runner, self_test

    bundle = bundles["tracker"]
    golden = bundle.manifest.golden
    assert golden.sequence and list(golden.gate_frames) == list(range(golden.frames))
    runner = onnxruntime_runner(bundle.onnx_path, bundle.manifest.precision)
    assert self_test(bundle, runner.infer, runner.info).passed

    def forgets_its_state(feed: Feed) -> Outputs:
        return runner.infer({**feed, "hidden": np.zeros_like(feed["hidden"])})

    forgetful = self_test(bundle, forgets_its_state, runner.info)
    assert not forgetful.passed and "error_vs_tolerance" in forgetful.reasons[0]
