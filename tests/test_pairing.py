"""Several sources into one model: sets made by capture time, and one answer for every frame of every source."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server.pairing import Pairer, PairingSettings
from edgescope.runtime.transport import channel_options
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

WAIT = stream_pb2.PairingPolicy.MODE_WAIT
NEWEST = stream_pb2.PairingPolicy.MODE_NEWEST
DROP = stream_pb2.PairingPolicy.MODE_DROP
MS = 1_000_000


@dataclass
class Item:
    frame: stream_pb2.Frame
    received_wall_ns: int = 0


class Recorder:
    """Every answer the pairer gives, by (source, seq); a second answer for one frame fails the test."""

    def __init__(self) -> None:
        self.sets: list[tuple[Item, dict[str, Item]]] = []
        self.answers: dict[tuple[str, int], str] = {}

    def _answer(self, item: Item, what: str) -> None:
        key = (item.frame.source, item.frame.seq)
        assert key not in self.answers, f"{key} answered twice"
        self.answers[key] = what

    def on_set(self, lead: Item, partners: dict[str, Item]) -> None:
        self.sets.append((lead, partners))
        self._answer(lead, "set")

    def on_taken(self, partner: Item, lead: Item) -> None:
        self._answer(partner, "paired")

    def on_unpaired(self, item: Item) -> None:
        self._answer(item, "unpaired")


def _pairer(recorder: Recorder, **settings: float) -> Pairer[Item]:
    return Pairer(
        "white", ["nir"], PairingSettings(**settings), recorder.on_set, recorder.on_taken, recorder.on_unpaired
    )  # type: ignore[arg-type]


def _timeline(white_fps: float, nir_fps: float, offset_ms: float, seconds: float) -> list[Item]:
    """Frames of two sources in capture order, one seq order across both."""
    stamps = [(k * 1e9 / white_fps, "white") for k in range(int(seconds * white_fps))]
    stamps += [(offset_ms * MS + k * 1e9 / nir_fps, "nir") for k in range(int(seconds * nir_fps))]
    stamps.sort()
    return [
        Item(stream_pb2.Frame(seq=seq, source=source, capture_time_ns=int(1e18 + t)))
        for seq, (t, source) in enumerate(stamps)
    ]


async def _play(pairer: Pairer[Item], items: list[Item], *, real_time: bool = False) -> None:
    start = items[0].frame.capture_time_ns
    loop = asyncio.get_running_loop()
    began = loop.time()
    for item in items:
        if real_time:
            await asyncio.sleep(max(0.0, began + (item.frame.capture_time_ns - start) / 1e9 - loop.time()))
        pairer.add(item)
    await asyncio.sleep(0)


def test_two_rates_make_sets_within_half_the_faster_period_and_answer_every_frame() -> None:
    async def scenario() -> tuple[Recorder, Pairer[Item], int]:
        recorder = Recorder()
        pairer = _pairer(recorder, mode=WAIT)
        items = _timeline(30, 25, offset_ms=7, seconds=4)
        await _play(pairer, items)
        pairer.close()
        return recorder, pairer, len(items)

    recorder, pairer, count = asyncio.run(scenario())
    assert len(recorder.answers) == count  # every frame, exactly once (a second answer fails in Recorder)
    tolerance_ns = 1e9 / 30 / 2
    assert pairer.tolerance_ms() == pytest.approx(1000 / 30 / 2, rel=1e-3)
    skews = [p.frame.capture_time_ns - lead.frame.capture_time_ns for lead, ps in recorder.sets for p in ps.values()]
    assert skews and max(abs(s) for s in skews) <= tolerance_ns
    # Each set's partner is the nir frame captured nearest to its lead.
    nir = sorted(i.frame.capture_time_ns for i in _timeline(30, 25, 7, 4) if i.frame.source == "nir")
    for lead, partners in recorder.sets:
        nearest = min(nir, key=lambda t: abs(t - lead.frame.capture_time_ns))
        assert partners["nir"].frame.capture_time_ns == nearest
    # 25 nir frames a second cannot pair every one of 30 white frames within 16.7 ms, but most.
    assert 0.6 * 120 <= pairer.stats.sets < 120


def test_a_source_that_stops_leaves_the_other_answered_unpaired_without_waiting_long() -> None:
    async def scenario() -> tuple[Recorder, float]:
        recorder = Recorder()
        pairer = _pairer(recorder, mode=WAIT, tolerance_ms=10, wait_ms=30)
        items = [
            i for i in _timeline(30, 25, 2, 1) if i.frame.source == "white" or i.frame.capture_time_ns < 1e18 + 0.4e9
        ]
        loop = asyncio.get_running_loop()
        began = loop.time()
        await _play(pairer, items, real_time=True)
        # Nothing is closed: the waits alone must answer the white frames after nir stopped.
        await asyncio.sleep(0.1)
        assert len(recorder.answers) == len(items)
        return recorder, loop.time() - began

    recorder, _elapsed = asyncio.run(scenario())
    late_white = [seq for (source, seq), what in recorder.answers.items() if source == "white" and what == "unpaired"]
    assert len(late_white) >= 15  # the 0.6 s of white frames with no nir at all


def test_newest_takes_the_newest_older_partner_and_drop_never_waits() -> None:
    async def scenario(mode: int) -> Recorder:
        recorder = Recorder()
        pairer = _pairer(recorder, mode=mode, tolerance_ms=5, max_age_ms=50)
        base = int(1e18)
        for seq, (source, t_ms) in enumerate([("nir", 0), ("nir", 20), ("white", 40), ("white", 100), ("nir", 101)]):
            pairer.add(Item(stream_pb2.Frame(seq=seq, source=source, capture_time_ns=base + t_ms * MS)))
        await asyncio.sleep(0)
        pairer.close()
        return recorder

    newest = asyncio.run(scenario(NEWEST))
    assert [(lead.frame.seq, ps["nir"].frame.seq) for lead, ps in newest.sets] == [(2, 1)]
    assert newest.answers[("nir", 0)] == "unpaired" and newest.answers[("white", 3)] == "unpaired"
    dropped = asyncio.run(scenario(DROP))
    # Within 5 ms: only white@100 / nir@101, but drop mode answered white@100 before nir@101 was read.
    assert dropped.sets == [] and set(dropped.answers.values()) == {"unpaired"}


def test_waits_do_not_run_out_while_the_stream_holds_frames_back_itself() -> None:
    """A busy model stops the stream's reading: a leading frame's partner is already sent, right behind it."""

    async def scenario() -> Recorder:
        recorder = Recorder()
        reading = [False]
        pairer: Pairer[Item] = Pairer(
            "white",
            ["nir"],
            PairingSettings(mode=WAIT, tolerance_ms=10, wait_ms=10),
            recorder.on_set,
            recorder.on_taken,
            recorder.on_unpaired,
            lambda: reading[0],
        )
        base = int(1e18)
        pairer.add(Item(stream_pb2.Frame(seq=0, source="white", capture_time_ns=base)))
        await asyncio.sleep(0.05)  # five waits, none of them spent waiting on the client
        assert recorder.answers == {}
        pairer.add(Item(stream_pb2.Frame(seq=1, source="nir", capture_time_ns=base + 3 * MS)))
        pairer.add(Item(stream_pb2.Frame(seq=2, source="white", capture_time_ns=base + 200 * MS)))
        reading[0] = True  # now the stream waits on its client: white@200 ms waits 10 ms, then goes unpaired
        await asyncio.sleep(0.05)
        return recorder

    recorder = asyncio.run(scenario())
    assert recorder.answers == {("white", 0): "set", ("nir", 1): "paired", ("white", 2): "unpaired"}


def test_pairing_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="tolerance_ms"):
        PairingSettings.of(stream_pb2.PairingPolicy(tolerance_ms=-1))


# --- on a real server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fusion_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    pytest.importorskip("torch")
    from edgescope.export import ExportRequest, export_model
    from edgescope.export.sources import SourceInput

    out = tmp_path_factory.mktemp("fusion") / "two-source"
    return export_model(
        ExportRequest(
            name="two-source",
            output=out,
            factory=str(Path(__file__).parent.parent / "examples/families/models.py") + ":build_two_source",
            input_height=64,
            input_width=64,
            color="rgb",
            data="synthetic:endoscopy?height=96&width=96",
            frame_source="white",
            source_inputs=[SourceInput.parse("nir:32x32:gray=synthetic:endoscopy?height=96&width=96&seed=3")],
            samples=3,
        ),
        log=lambda _line: None,
    )


@pytest.fixture(scope="module")
def fusion_server(fusion_bundle: Bundle, example_bundle: Bundle) -> Iterator[ServerThread]:
    running = ServerThread([fusion_bundle.path, example_bundle.path])
    try:
        yield running
    finally:
        running.stop()


def test_the_manifest_binds_each_source_with_its_own_preprocessing(fusion_bundle: Bundle) -> None:
    manifest = fusion_bundle.manifest
    assert [i.name for i in manifest.inputs] == ["image", "nir"]
    bindings = {b.input: b for b in manifest.input_bindings}
    assert bindings["image"].source == "white" and bindings["image"].role == 1
    nir = bindings["nir"]
    assert nir.role == 4 and nir.source == "nir" and (nir.preprocessing.height, nir.preprocessing.width) == (32, 32)
    assert manifest.validation.passed and manifest.golden.frames == 3


RGB = encode_raw(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
GRAY = encode_raw(np.random.default_rng(2).integers(0, 255, (48, 48), dtype=np.uint8))


def _stream(target: str, frames: list[stream_pb2.Frame]) -> list[stream_pb2.Result]:
    with grpc.insecure_channel(target, options=channel_options(64 << 20)) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        return list(stub.Stream(iter(frames), timeout=60))


def _two_sources(model: str, seconds: float, stop_nir_at: float | None = None) -> list[stream_pb2.Frame]:
    frames = []
    for item in _timeline(30, 25, offset_ms=5, seconds=seconds):
        t = (item.frame.capture_time_ns - 1e18) / 1e9
        if item.frame.source == "nir" and stop_nir_at is not None and t >= stop_nir_at:
            continue
        frame = stream_pb2.Frame(
            stream_id="fusion",
            seq=len(frames),
            model=model,
            source=item.frame.source,
            capture_time_ns=item.frame.capture_time_ns,
            policy=stream_pb2.STREAM_POLICY_EVERY,
        )
        frame.raw.CopyFrom(RGB if item.frame.source == "white" else GRAY)
        frames.append(frame)
    return frames


def test_a_stream_of_two_sources_gets_one_answer_per_frame_and_sets_within_the_tolerance(
    fusion_server: ServerThread,
) -> None:
    frames = _two_sources("two-source", seconds=1.4, stop_nir_at=0.6)
    results = _stream(fusion_server.target, frames)
    assert [r.seq for r in results] == [f.seq for f in frames]
    by_code: dict[int, list[stream_pb2.Result]] = {}
    for result in results:
        by_code.setdefault(result.status.code, []).append(result)
    ok = by_code[stream_pb2.FRAME_STATUS_CODE_OK]
    assert ok and all(r.pairing.source == "white" and len(r.pairing.partners) == 1 for r in ok)
    assert all(abs(r.pairing.partners[0].skew_ns) <= r.pairing.tolerance_ms * MS for r in ok)
    assert all(r.outputs for r in ok)
    paired = by_code[stream_pb2.FRAME_STATUS_CODE_PAIRED]
    leads = {r.seq for r in ok}
    assert all(r.pairing.source == "nir" and r.pairing.lead_seq in leads for r in paired)
    unpaired = [r for r in by_code[stream_pb2.FRAME_STATUS_CODE_DROPPED] if r.status.drop_reason == 4]
    # After nir stops at 0.6 s, every white frame is answered unpaired.
    late_white = [f.seq for f in frames if f.source == "white" and f.capture_time_ns - 1e18 > 0.65e9]
    assert set(late_white) <= {r.seq for r in unpaired}
    # Half a second after nir's last frame, white's unpaired answers say that nir went silent.
    silent = stream_pb2.Alert.KIND_SOURCE_SILENT
    very_late = [r for r in unpaired if r.pairing.source == "white" and r.capture_time_ns - 1e18 > 1.15e9]
    assert very_late and all(any(a.kind == silent and "nir" in a.message for a in r.alerts) for r in very_late)
    assert not any(a.kind == silent for r in ok for a in r.alerts)
    assert stream_pb2.FRAME_STATUS_CODE_ERROR not in by_code
    # Prometheus counts what the answers say (the registry is the server's own, read in-process).
    registry = fusion_server.running.telemetry.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": "two-source", **labels}) or 0.0

    assert sample("edgescope_pairing_skew_seconds_count") == len(ok)
    assert sample("edgescope_paired_frames_total") == len(paired)
    white_unpaired = sum(1 for r in unpaired if r.pairing.source == "white")
    assert white_unpaired >= len(late_white)
    assert sample("edgescope_unpaired_frames_total", source="white") == white_unpaired
    assert sample("edgescope_inference_failure_total") == 0
    # The telemetry snapshot (the dashboard's data) carries the same.
    (group,) = [g for g in fusion_server.running.telemetry.metrics.snapshot().models if g.model == "two-source"]
    assert group.pairing_skew.count == len(ok) and group.pairing_skew.max_ms <= ok[0].pairing.tolerance_ms
    assert {u.reason: u.count for u in group.unpaired}["white"] == white_unpaired


def test_a_source_the_model_does_not_take_fails_that_frame_only(fusion_server: ServerThread) -> None:
    frames = _two_sources("two-source", seconds=0.3)
    frames[4].source = "ultrasound"
    results = _stream(fusion_server.target, frames)
    assert len(results) == len(frames)
    assert results[4].status.code == stream_pb2.FRAME_STATUS_CODE_ERROR
    assert "ultrasound" in results[4].status.reason and "white, nir" in results[4].status.reason
    assert any(r.status.code == stream_pb2.FRAME_STATUS_CODE_OK for r in results[5:])


def test_sources_on_a_model_of_one_source_and_a_lone_frame_on_a_fusion_model_are_clear_errors(
    fusion_server: ServerThread,
) -> None:
    single = stream_pb2.Frame(stream_id="s", seq=0, model="lesion-unet", source="white", raw=GRAY)
    assert "takes frames of one source" in _stream(fusion_server.target, [single])[0].status.reason
    lone = stream_pb2.Frame(stream_id="s", seq=0, model="two-source", raw=RGB)
    (result,) = _stream(fusion_server.target, [lone])
    assert result.status.code == stream_pb2.FRAME_STATUS_CODE_ERROR
    assert "source 'nir'" in result.status.reason


def test_infer_of_one_frame_on_a_fusion_model_is_invalid_argument(fusion_server: ServerThread) -> None:
    with grpc.insecure_channel(fusion_server.target, options=channel_options(64 << 20)) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(stream_pb2.Frame(stream_id="u", model="two-source", raw=RGB), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "source 'nir'" in (caught.value.details() or "")
        # The model still serves streams afterwards.
        results = _stream(fusion_server.target, _two_sources("two-source", seconds=0.2))
        assert any(r.status.code == stream_pb2.FRAME_STATUS_CODE_OK for r in results)


def test_kserve_lists_every_source_input_and_infers_with_all_of_them(
    fusion_server: ServerThread, fusion_bundle: Bundle
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import onnxruntime as ort

    client = grpcclient.InferenceServerClient(fusion_server.target)
    metadata = client.get_model_metadata("two-source")
    assert [(i.name, list(i.shape)) for i in metadata.inputs] == [("image", [-1, 3, 64, 64]), ("nir", [-1, 1, 32, 32])]
    rng = np.random.default_rng(4)
    feed = {"image": rng.random((1, 3, 64, 64), dtype=np.float32), "nir": rng.random((1, 1, 32, 32), dtype=np.float32)}
    inputs = []
    for name, tensor in feed.items():
        inputs.append(grpcclient.InferInput(name, list(tensor.shape), "FP32"))
        inputs[-1].set_data_from_numpy(tensor)
    result = client.infer("two-source", inputs)
    session = ort.InferenceSession(str(fusion_bundle.onnx_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, feed)
    np.testing.assert_allclose(result.as_numpy(fusion_bundle.manifest.outputs[0].name), expected, rtol=1e-5, atol=1e-5)
    client.close()


def test_validate_replays_a_fusion_bundle_and_refuses_to_rerun_its_gate_without_its_sources(
    fusion_bundle: Bundle,
) -> None:
    from edgescope.errors import ConfigError
    from edgescope.export.validate import ValidateRequest, validate_bundle

    with pytest.raises(ConfigError, match="several sources"):
        validate_bundle(
            ValidateRequest(bundle=fusion_bundle.path, factory="examples/families/models.py:build_two_source"),
            log=lambda _line: None,
        )


def test_a_capture_of_two_sources_pairs_them_on_the_server(fusion_bundle: Bundle) -> None:
    from edgescope.runtime.server.capture import CaptureConfig

    white = "white=synthetic:endoscopy?height=96&width=96&fps=30"
    nir = "nir=synthetic:fluorescence?height=64&width=64&fps=25"
    capture = CaptureConfig.parse(f"fused={white}|{nir}@two-source")
    running = ServerThread([fusion_bundle.path], captures=[capture])
    results: list[stream_pb2.Result] = []
    try:
        with grpc.insecure_channel(running.target, options=channel_options(64 << 20)) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Subscribe(
                stream_pb2.SubscribeRequest(capture="fused"), timeout=60
            )
            for result in call:
                results.append(result)
                if len(results) == 40:
                    call.cancel()
                    break
    finally:
        running.stop()
    ok = [r for r in results if r.status.code == stream_pb2.FRAME_STATUS_CODE_OK]
    paired = [r for r in results if r.status.code == stream_pb2.FRAME_STATUS_CODE_PAIRED]
    assert ok and paired, [stream_pb2.FrameStatusCode.Name(r.status.code) for r in results]
    assert all(r.pairing.partners[0].source == "nir" for r in ok)
    assert all(abs(r.pairing.partners[0].skew_ns) <= r.pairing.tolerance_ms * MS for r in ok)
    assert not any(r.status.code == stream_pb2.FRAME_STATUS_CODE_ERROR for r in results)
