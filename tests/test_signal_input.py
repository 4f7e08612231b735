"""A model fed by an image source and a 1-D signal source (ultrasound with an ECG lead): export, serve, stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import BundleError, ConfigError, ExportError, FrameError
from edgescope.export.sources import SignalInput, parse_source_input
from edgescope.runtime.pipeline.decode import decode_frame, encode_raw
from edgescope.runtime.pipeline.manifest_check import check_manifest
from edgescope.runtime.pipeline.signal import signal_tensor, window_of
from edgescope.runtime.sources import SourceFrame, open_source
from edgescope.runtime.sources.ecg import SyntheticEcgSource, ecg
from edgescope.runtime.transport import channel_options
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

WINDOW = 128
RATE = 250.0
SPEC = manifest_pb2.SignalSpec(channels=1, samples=WINDOW, sample_rate_hz=RATE, units="mV", mean=0.0, std=0.5)
OK = stream_pb2.FRAME_STATUS_CODE_OK
ERROR = stream_pb2.FRAME_STATUS_CODE_ERROR


# --- the synthetic ECG and the window ----------------------------------------------------------------


def test_the_synthetic_ecg_beats_at_its_heart_rate_with_r_peaks_above_the_rest() -> None:
    times = np.arange(0, 10, 1 / RATE)
    trace = ecg(times, bpm=72)
    peaks = np.flatnonzero((trace[1:-1] > 0.8) & (trace[1:-1] >= trace[:-2]) & (trace[1:-1] > trace[2:]))
    assert len(peaks) in (11, 12, 13)
    assert np.median(np.diff(peaks)) / RATE == pytest.approx(60 / 72, abs=2 / RATE)
    assert trace.min() < -0.1  # the S wave dips below the baseline


def test_ecg_windows_end_at_each_frame_time_and_keep_one_signal_across_windows() -> None:
    with open_source(f"synthetic:ecg?frames=31&fps=30&window={WINDOW}&rate=250&bpm=60&seed=2") as source:
        frames = list(source)
    assert len(frames) == 31 and frames[0].pixels.size == 0
    assert all(f.signal is not None and f.signal.samples == WINDOW and f.signal.units == "mV" for f in frames)
    assert frames[30].timestamp_s == pytest.approx(1.0)
    assert all(abs(f.timestamp_s - f.index / 30) < 1 / RATE for f in frames)
    # Window k's samples, shifted by the samples between its end and window k+1's, are window k+1's.
    first, second = (np.frombuffer(f.signal.data, "<f4") for f in frames[3:5] if f.signal is not None)
    shift = round((frames[4].timestamp_s - frames[3].timestamp_s) * RATE)
    np.testing.assert_array_equal(first[shift:], second[:-shift])


def test_synthetic_ecg_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="bpm"):
        SyntheticEcgSource(bpm=0)
    with pytest.raises(ConfigError, match="unknown parameter 'height'"):
        open_source("synthetic:ecg?height=64")
    with pytest.raises(ConfigError, match="unknown parameter 'bpm'"):
        open_source("synthetic:ultrasound?bpm=60")


def test_a_window_becomes_the_normalised_input_and_a_mismatch_says_what_differs() -> None:
    samples = np.linspace(-1, 1, WINDOW)[None, :]
    tensor = signal_tensor(window_of(samples, RATE, "mV"), SPEC, "ecg")
    assert tensor.shape == (1, 1, WINDOW) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], samples / 0.5, rtol=1e-6)
    with pytest.raises(FrameError, match="1 channel\\(s\\) x 100 samples; the model takes 1 channel\\(s\\) x 128"):
        signal_tensor(window_of(np.zeros((1, 100)), RATE), SPEC, "ecg")
    with pytest.raises(FrameError, match="2 channel"):
        signal_tensor(window_of(np.zeros((2, WINDOW)), RATE), SPEC, "ecg")
    with pytest.raises(FrameError, match="sampled at 500 Hz"):
        signal_tensor(window_of(samples, 500.0), SPEC, "ecg")
    with pytest.raises(FrameError, match="'uV'"):
        signal_tensor(window_of(samples, RATE, "uV"), SPEC, "ecg")
    short = window_of(samples, RATE)
    short.data = short.data[:-4]
    with pytest.raises(FrameError, match="bytes of samples"):
        signal_tensor(short, SPEC, "ecg")
    with pytest.raises(FrameError, match="not finite"):
        signal_tensor(window_of(np.full((1, WINDOW), np.nan), RATE), SPEC, "ecg")
    # Where pixels are wanted (the frame input, a model of one source), a window is refused as such.
    with pytest.raises(FrameError, match="carries a signal window, which only a model's signal source takes"):
        decode_frame(stream_pb2.Frame(signal=window_of(samples, RATE)))


def test_the_export_syntax_of_a_signal_input() -> None:
    parsed = parse_source_input("ecg:signal:2x500@250Hz:uV:0.1/0.4=synthetic:ecg")
    assert parsed == SignalInput("ecg", 2, 500, 250.0, "uV", 0.1, 0.4, "synthetic:ecg")
    assert parse_source_input("ecg:signal:1x256@250Hz=synthetic:ecg") == SignalInput(
        "ecg", 1, 256, 250.0, "mV", 0.0, 1.0, "synthetic:ecg"
    )
    for bad in ("ecg:signal:1x256=synthetic:ecg", "ecg:signal:0x256@250Hz=synthetic:ecg", "ecg:signal:1x256@250Hz"):
        with pytest.raises(ConfigError, match="signal input"):
            parse_source_input(bad)


# --- exported, served and streamed -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    pytest.importorskip("torch")
    from edgescope.export import ExportRequest, export_model

    return export_model(
        ExportRequest(
            name="ecg-gated",
            output=tmp_path_factory.mktemp("signal") / "ecg-gated",
            factory=str(Path(__file__).parent.parent / "examples/families/models.py") + ":build_image_and_signal",
            task="classification",
            labels=["diastole", "systole"],
            activation="softmax",
            input_height=64,
            input_width=64,
            data="synthetic:ultrasound?height=96&width=96",
            frame_source="us",
            source_inputs=[parse_source_input(f"ecg:signal:1x{WINDOW}@250Hz:mV:0/0.5=synthetic:ecg?window={WINDOW}")],
            samples=3,
            formats=("bundle", "triton"),
        ),
        log=lambda _line: None,
    )


def test_gate_data_whose_windows_are_not_the_models_is_refused_at_export(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from edgescope.export import ExportRequest, export_model

    request = ExportRequest(
        name="ecg-gated",
        output=tmp_path / "ecg-gated",
        factory=str(Path(__file__).parent.parent / "examples/families/models.py") + ":build_image_and_signal",
        task="classification",
        labels=["diastole", "systole"],
        input_height=64,
        input_width=64,
        data="synthetic:ultrasound?height=96&width=96",
        frame_source="us",
        source_inputs=[parse_source_input(f"ecg:signal:1x{WINDOW}@250Hz=synthetic:ecg")],
        samples=2,
    )
    with pytest.raises(ExportError, match=f"256 samples; the model takes 1 channel\\(s\\) x {WINDOW} samples"):
        export_model(request, log=lambda _line: None)


@pytest.fixture(scope="module")
def gated_server(gated_bundle: Bundle) -> Iterator[ServerThread]:
    running = ServerThread([gated_bundle.path])
    try:
        yield running
    finally:
        running.stop()


def test_the_manifest_and_the_triton_config_declare_the_signal_window_and_the_gate_ran_it(gated_bundle: Bundle) -> None:
    manifest = gated_bundle.manifest
    assert [i.name for i in manifest.inputs] == ["image", "ecg"]
    assert [d.size for d in manifest.inputs[1].shape[1:]] == [1, WINDOW]
    (ecg_binding,) = [b for b in manifest.input_bindings if b.role == manifest_pb2.INPUT_ROLE_SOURCE]
    assert ecg_binding.source == "ecg" and ecg_binding.signal == SPEC
    assert manifest.validation.passed and manifest.golden.frames == 3
    triton = (gated_bundle.path / "triton/ecg-gated/config.pbtxt").read_text()
    assert f'name: "ecg"\n    data_type: TYPE_FP32\n    dims: [ 1, {WINDOW} ]' in triton
    broken = manifest_pb2.ModelManifest()
    broken.CopyFrom(manifest)
    broken.input_bindings[1].signal.samples = 0
    with pytest.raises(BundleError, match="signal source 'ecg' takes 1 channel\\(s\\) x 0 samples"):
        check_manifest(broken)


def test_streamed_with_the_real_client_every_frame_is_answered_as_onnx_runtime_computes_it(
    gated_server: ServerThread, gated_bundle: Bundle
) -> None:
    import onnxruntime as ort

    from edgescope.runtime.client.stream import StreamOptions, stream_source
    from edgescope.runtime.pipeline.preprocess import preprocess
    from edgescope.runtime.sources.merged import named_sources, open_sources

    specs = [
        "us=synthetic:ultrasound?frames=12&height=96&width=96",
        f"ecg=synthetic:ecg?frames=12&window={WINDOW}&bpm=80",
    ]
    answers: list[tuple[SourceFrame, stream_pb2.Result]] = []
    options = StreamOptions(
        target=gated_server.target, model="ecg-gated", realtime=False, policy=stream_pb2.STREAM_POLICY_EVERY
    )
    with open_sources(named_sources(specs)) as source:
        report = asyncio.run(stream_source(source, options, lambda frame, result: answers.append((frame, result))))
    assert report.sent == 24 and len(answers) == 24 and not report.error
    sent = {result.seq: frame for frame, result in answers}
    leads = [(frame, result) for frame, result in answers if frame.source == "us"]
    assert all(result.status.code == OK for _, result in leads), [r.status.reason for _, r in leads]
    assert all(r.status.code == stream_pb2.FRAME_STATUS_CODE_PAIRED for f, r in answers if f.source == "ecg")
    session = ort.InferenceSession(str(gated_bundle.onnx_path), providers=["CPUExecutionProvider"])
    manifest = gated_bundle.manifest
    for frame, result in leads:
        (partner,) = result.pairing.partners
        window = sent[partner.seq].signal
        assert window is not None
        image = preprocess(frame.pixels, manifest.preprocessing, None)[0]
        (logits,) = session.run(None, {"image": image, "ecg": signal_tensor(window, SPEC, "ecg")})
        expected = np.exp(logits[0]) / np.exp(logits[0]).sum()
        np.testing.assert_allclose(result.outputs[0].classes.scores, expected, rtol=1e-4, atol=1e-6)


def test_kserve_lists_the_signal_input_with_its_window_shape(gated_server: ServerThread) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(gated_server.target)
    metadata = client.get_model_metadata("ecg-gated")
    assert [(i.name, list(i.shape)) for i in metadata.inputs] == [("image", [-1, 1, 64, 64]), ("ecg", [-1, 1, WINDOW])]
    client.close()


GRAY = encode_raw(np.random.default_rng(4).integers(0, 255, (96, 96), dtype=np.uint8))


def _frames(windows: dict[int, stream_pb2.SignalWindow]) -> list[stream_pb2.Frame]:
    """Image and ECG frames at 30 fps, each ECG frame ``windows[k]`` where given, else a good window."""
    good = window_of(ecg(np.arange(WINDOW) / RATE, bpm=70)[None, :], RATE, "mV")
    frames: list[stream_pb2.Frame] = []
    for k in range(10):
        for source in ("us", "ecg"):
            frame = stream_pb2.Frame(
                stream_id="gated",
                seq=len(frames),
                model="ecg-gated",
                source=source,
                capture_time_ns=10**18 + k * 33_333_333,
                policy=stream_pb2.STREAM_POLICY_EVERY,
            )
            if source == "us":
                frame.raw.CopyFrom(GRAY)
            else:
                frame.signal.CopyFrom(windows.get(k, good))
            frames.append(frame)
    return frames


def test_a_window_of_the_wrong_length_or_channels_fails_that_frame_only(gated_server: ServerThread) -> None:
    wrong = {
        2: window_of(np.zeros((1, WINDOW // 2)), RATE),
        5: window_of(np.zeros((3, WINDOW)), RATE),
    }
    frames = _frames(wrong)
    frames[15].raw.CopyFrom(GRAY)  # an image where the ECG's window belongs (k = 7)
    frames[18].signal.CopyFrom(frames[19].signal)  # a window where the image belongs (k = 9)
    with grpc.insecure_channel(gated_server.target, options=channel_options(16 << 20)) as channel:
        results = list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=60))
    assert [r.seq for r in results] == [f.seq for f in frames]
    errors = {r.seq: r.status.reason for r in results if r.status.code == ERROR}
    assert set(errors) == {5, 11, 15, 18}
    assert f"{WINDOW // 2} samples; the model takes 1 channel(s) x {WINDOW} samples at 250 Hz" in errors[5]
    assert "3 channel(s)" in errors[11]
    assert "is a signal: its frames carry a window" in errors[15]
    assert "source 'us' takes images, not a signal window" in errors[18]
    # Every other image frame made a set with its ECG window, before and after the bad ones.
    lead_codes = {r.seq: r.status.code for r in results if r.seq % 2 == 0 and r.seq not in errors}
    assert lead_codes[0] == OK and lead_codes[16] == OK
    assert sum(code == OK for code in lead_codes.values()) >= 6


def test_a_server_capture_of_an_image_source_and_an_ecg_source_pairs_them(gated_bundle: Bundle) -> None:
    from edgescope.runtime.server.capture import CaptureConfig

    us = "us=synthetic:ultrasound?height=96&width=96&fps=30"
    lead = f"ecg=synthetic:ecg?window={WINDOW}&fps=30"
    running = ServerThread([gated_bundle.path], captures=[CaptureConfig.parse(f"gated={us}|{lead}@ecg-gated")])
    results: list[stream_pb2.Result] = []
    try:
        with grpc.insecure_channel(running.target, options=channel_options(16 << 20)) as channel:
            call = stream_pb2_grpc.StreamServiceStub(channel).Subscribe(
                stream_pb2.SubscribeRequest(capture="gated"), timeout=60
            )
            for result in call:
                results.append(result)
                if len(results) == 30:
                    call.cancel()
                    break
    finally:
        running.stop()
    codes = [stream_pb2.FrameStatusCode.Name(r.status.code) for r in results]
    ok = [r for r in results if r.status.code == OK]
    assert ok and all(r.pairing.partners[0].source == "ecg" for r in ok), codes
    assert any(r.status.code == stream_pb2.FRAME_STATUS_CODE_PAIRED for r in results), codes
    assert not any(r.status.code == ERROR for r in results), [r.status.reason for r in results]
