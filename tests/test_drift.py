"""A stream's frames tested together over time: the CUSUM, its threshold, what the server says on drift."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from prometheus_client import generate_latest
from pydicom.data import get_testdata_file

from edgescope.bundle import MANIFEST_FILE, Bundle
from edgescope.cli import build_parser
from edgescope.export.domain import domain_profile
from edgescope.runtime.archive.audit import verify
from edgescope.runtime.client.clock import ClockEstimator
from edgescope.runtime.client.stream import _record
from edgescope.runtime.pipeline.confidence import classification_confidence
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.drift import CLIP, REFERENCE, DriftTest, cusum_threshold, false_alarm_frames
from edgescope.runtime.server.registry import WITHHOLD, ModelPolicy, MonitoringOptions
from edgescope.runtime.server.stages import withhold_if_unsure
from edgescope.runtime.sources import open_source
from edgescope.runtime.telemetry.latency import LatencyRecorder
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

CINE = f"dicom:{get_testdata_file('color3d_jpeg_baseline.dcm')}"
FIT_FRAMES = 80
DRIFT = stream_pb2.Alert.KIND_DRIFT
OUT_OF_DOMAIN = stream_pb2.Alert.KIND_OUT_OF_DOMAIN


def test_the_threshold_grows_with_the_time_between_false_alarms() -> None:
    day, hour = cusum_threshold(false_alarm_frames(24)), cusum_threshold(false_alarm_frames(1))
    assert 9 < hour < day < 14


def test_one_outlying_frame_cannot_trip_the_test_and_a_run_of_them_does() -> None:
    threshold = cusum_threshold(false_alarm_frames(24))
    test = DriftTest()
    assert not test.update(1000.0, threshold)
    assert test.statistic == CLIP - REFERENCE
    trips = [test.update(1000.0, threshold) for _ in range(10)]
    # One alert per episode, within h / (CLIP - REFERENCE) frames.
    assert trips.count(True) == 1 and trips.index(True) + 2 <= threshold / (CLIP - REFERENCE) + 1
    # Back in domain: the statistic returns to 0 and ends the episode; a new shift alerts again.
    while test.drifting:
        test.update(0.0, threshold)
    assert any(test.update(1000.0, threshold) for _ in range(10))


def _cine() -> list[np.ndarray]:
    with open_source(CINE) as source:
        return [frame.pixels for frame in source]


@pytest.fixture(scope="module")
def cine_bundle(example_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model with its domain profile fitted on the echo cine's first 80 frames, as
    ``export --data`` on that cine would fit it."""
    bundle = tmp_path_factory.mktemp("cine") / "lesion-unet"
    shutil.copytree(example_bundle.path, bundle)
    manifest = example_bundle.manifest
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in manifest.outputs]

    def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, feed), strict=True))

    profile = domain_profile(infer, manifest, CINE, FIT_FRAMES, 1e-3)
    written = json.loads((bundle / MANIFEST_FILE).read_text())
    written["domain"] = json_format.MessageToDict(profile)
    (bundle / MANIFEST_FILE).write_text(json.dumps(written))
    return bundle


@pytest.fixture(scope="module")
def cine_server(cine_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    running = ServerThread([cine_bundle], audit_log=tmp_path_factory.mktemp("audit") / "audit.jsonl")
    try:
        yield running
    finally:
        running.stop()


def _stream(server: ServerThread, stream_id: str, frames: list[np.ndarray]) -> list[stream_pb2.Result]:
    messages = [stream_pb2.Frame(stream_id=stream_id, seq=i, raw=encode_raw(f)) for i, f in enumerate(frames)]
    with grpc.insecure_channel(server.target) as channel:
        return list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(messages), timeout=120))


def _drift_alerts(results: list[stream_pb2.Result]) -> list[int]:
    return [r.seq for r in results if DRIFT in [a.kind for a in r.alerts]]


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gain x3": lambda f: np.clip(f.astype(np.float32) * 3, 0, 255).astype(np.uint8),
    "inverted": lambda f: (255 - f).astype(np.uint8),
    "blur": lambda f: cv2.GaussianBlur(f, (0, 0), 4),
}


def test_an_in_domain_stream_never_drifts_and_a_shifted_one_does_within_a_few_frames(cine_server: ServerThread) -> None:
    rest = _cine()[FIT_FRAMES:]
    calm = _stream(cine_server, "calm", rest)
    assert all(r.status.code == stream_pb2.FRAME_STATUS_CODE_OK for r in calm)
    assert _drift_alerts(calm) == [] and not any(r.domain.drifting for r in calm)
    assert all(r.domain.drift_threshold > 0 and r.domain.drift < r.domain.drift_threshold for r in calm)
    for name, shift in SHIFTS.items():
        # In domain first, then the shift, on one stream: the alert comes once, soon after the shift starts.
        results = _stream(cine_server, name, rest[:10] + [shift(f) for f in rest[10:30]])
        alerts = _drift_alerts(results)
        assert len(alerts) == 1 and 10 <= alerts[0] < 10 + 8, (name, alerts)
        assert all(r.domain.drifting for r in results[alerts[0] :])
    metrics = generate_latest(cine_server.running.telemetry.metrics.registry).decode()
    assert f'edgescope_domain_drift_alerts_total{{model="lesion-unet"}} {float(len(SHIFTS))}' in metrics
    assert 'edgescope_domain_drift{model="lesion-unet"} 2.0' in metrics
    # The telemetry snapshot (the page's data) counts the same, per model and per stream.
    snapshot = cine_server.running.telemetry.metrics.snapshot()
    (model,) = [g for g in snapshot.models if g.model == "lesion-unet"]
    assert model.drift_alerts == len(SHIFTS)
    out_of_domain = sum(1 for r in results if r.domain.checked and not r.domain.in_domain)
    (last,) = [g for g in snapshot.streams if g.stream_id == name]
    assert last.out_of_domain_frames == out_of_domain > 0 and last.drift_alerts == 1
    trail = cine_server.running.registry.audit
    assert trail is not None and verify(trail.path).intact
    drifts = [json.loads(line) for line in trail.path.read_text().splitlines() if '"domain_drift"' in line]
    assert len(drifts) == len(SHIFTS) and {d["model"] for d in drifts} == {"lesion-unet"}


def test_every_segmentation_result_and_quantity_says_how_sure_the_model_is(cine_server: ServerThread) -> None:
    rest = _cine()[FIT_FRAMES : FIT_FRAMES + 12]
    calm = _stream(cine_server, "sure", rest)
    shifted = {"blur": _stream(cine_server, "unsure", [SHIFTS["blur"](f) for f in rest])}
    for result in calm:
        assert result.HasField("confidence") and 0.0 <= result.confidence <= 1.0
        assert result.quantities and all(q.HasField("confidence") for q in result.quantities)
    # Blur makes the model unsure; a gain or an inversion does not (it answers them confidently: see the
    # domain check for those).
    blurred = [r.confidence for r in shifted["blur"]]
    assert np.mean(blurred) < np.mean([r.confidence for r in calm]) - 0.05


def test_a_classification_is_as_sure_as_its_largest_probability() -> None:
    assert classification_confidence(np.asarray([[0.0, 0.0]], dtype=np.float32)) == pytest.approx(0.5)
    assert classification_confidence(np.asarray([[10.0, 0.0, 0.0]], dtype=np.float32)) > 0.99


def test_a_model_whose_policy_is_withhold_drops_the_quantities_of_frames_out_of_domain(cine_bundle: Path) -> None:
    rest = _cine()[FIT_FRAMES : FIT_FRAMES + 4]
    served = ServerThread([cine_bundle], monitoring=MonitoringOptions(out_of_domain={"lesion-unet": WITHHOLD}))
    try:
        calm = _stream(served, "calm", rest)
        inverted = _stream(served, "inverted", [SHIFTS["inverted"](f) for f in rest])
    finally:
        served.stop()
    for result in calm:
        assert result.domain.in_domain and result.quantities and not result.withheld
    for result in inverted:
        assert not result.domain.in_domain and not result.quantities
        assert result.withheld.startswith("quantities withheld: out of domain")
        # The mask and the alert stay, for a person to see what was not measured.
        assert result.outputs and OUT_OF_DOMAIN in [a.kind for a in result.alerts]


def test_under_withhold_an_unsure_answer_is_withheld_too() -> None:
    result = stream_pb2.Result(confidence=0.4, quantities=[stream_pb2.Quantity(name="lesion_area", value=3.0)])
    withhold_if_unsure(result, ModelPolicy(out_of_domain=WITHHOLD, min_confidence=0.6))
    assert not result.quantities and result.withheld == "quantities withheld: confidence 0.400 < 0.6"
    sure = stream_pb2.Result(confidence=0.9, quantities=[stream_pb2.Quantity(name="lesion_area", value=3.0)])
    withhold_if_unsure(sure, ModelPolicy(out_of_domain=WITHHOLD, min_confidence=0.6))
    assert sure.quantities and not sure.withheld


def test_the_policy_is_set_per_model_with_a_default_for_the_rest() -> None:
    args = build_parser().parse_args(
        ["serve", "b", "--out-of-domain", "withhold", "--out-of-domain", "other=annotate", "--min-confidence", "0.5"]
    )
    options = MonitoringOptions(out_of_domain=dict(args.out_of_domain), min_confidence=dict(args.min_confidence))
    assert options.policy("lesion-unet") == ModelPolicy(WITHHOLD, 0.5)
    assert options.policy("other") == ModelPolicy("annotate", 0.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "b", "--out-of-domain", "drop"])


def test_the_client_summary_counts_drift_alerts_and_withheld_frames() -> None:
    latency = LatencyRecorder()
    drifted = stream_pb2.Result(status=stream_pb2.FrameStatus(code=stream_pb2.FRAME_STATUS_CODE_OK))
    drifted.alerts.add(kind=DRIFT)
    withheld = stream_pb2.Result(status=drifted.status, withheld="quantities withheld: out of domain")
    for result in (drifted, withheld, stream_pb2.Result(status=drifted.status)):
        _record(latency, ClockEstimator(), result, time.perf_counter_ns())
    summary = latency.as_dict()
    assert (summary["drift_alerts"], summary["withheld_frames"]) == (1, 1)


def test_a_model_whose_policy_is_fallback_has_its_frames_out_of_domain_answered_by_the_other(
    cine_bundle: Path, example_bundle: Bundle, tmp_path: Path
) -> None:
    other = tmp_path / "synthetic-unet"
    shutil.copytree(example_bundle.path, other)
    written = json.loads((other / MANIFEST_FILE).read_text())
    written["name"] = "synthetic-unet"
    (other / MANIFEST_FILE).write_text(json.dumps(written))
    rest = _cine()[FIT_FRAMES : FIT_FRAMES + 3]
    policy = MonitoringOptions(out_of_domain={"lesion-unet": "fallback:synthetic-unet"})
    served = ServerThread([cine_bundle, other], monitoring=policy)

    def stream(stream_id: str, frames: list[np.ndarray]) -> list[stream_pb2.Result]:
        messages = [
            stream_pb2.Frame(stream_id=stream_id, seq=i, model="lesion-unet", raw=encode_raw(f))
            for i, f in enumerate(frames)
        ]
        with grpc.insecure_channel(served.target) as channel:
            return list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(messages), timeout=120))

    try:
        calm = stream("calm", rest)
        inverted = stream("inverted", [SHIFTS["inverted"](f) for f in rest])
    finally:
        served.stop()
    for result in calm:
        assert result.provenance.model == "lesion-unet" and not result.fallback_from and not result.model_results
    for result in inverted:
        assert result.provenance.model == "synthetic-unet" and result.fallback_from == "lesion-unet"
        (own,) = result.model_results
        assert own.model == "lesion-unet" and own.outputs
        assert any(a.kind == OUT_OF_DOMAIN and a.model == "lesion-unet" for a in result.alerts)
    # A fallback that is not loaded leaves the first model's own answer, and says so.
    alone = ServerThread([cine_bundle], monitoring=MonitoringOptions(out_of_domain={"*": "fallback:absent"}))
    try:
        (result,) = _stream(alone, "alone", [SHIFTS["inverted"](rest[0])])
    finally:
        alone.stop()
    assert result.provenance.model == "lesion-unet" and not result.fallback_from
    assert any("absent" in a.message and "not loaded" in a.message for a in result.alerts)
