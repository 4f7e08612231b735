"""The real server on loopback, driven by real gRPC clients."""

from __future__ import annotations

import asyncio

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgescope.bundle import Bundle
from edgescope.runtime.client.stream import StreamOptions, build_frame, stream_source
from edgescope.runtime.evaluation.metrics import dice
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.sources.base import SourceFrame
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.runtime.transport import channel_options
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

# The example bundle has a domain profile: every frame is also checked against it.
SERVER_STAGES = {"queue", "decode", "preprocess", "infer", "postprocess", "encode", "domain"}
OK = stream_pb2.FRAME_STATUS_CODE_OK
ERROR = stream_pb2.FRAME_STATUS_CODE_ERROR


def _frame(seq: int, model: str = "lesion-unet") -> stream_pb2.Frame:
    pixels = np.full((120, 160), 90, dtype=np.uint8)
    return stream_pb2.Frame(stream_id="t", seq=seq, model=model, raw=encode_raw(pixels))


def test_stream_answers_every_frame_in_order_with_timings_and_provenance(
    server: ServerThread, example_bundle: Bundle
) -> None:
    source = SyntheticUltrasoundSource(seed=11, n_frames=24)
    truth = {i: mask for i, (_, mask) in enumerate(source.frames_with_masks())}
    answers: list[tuple[SourceFrame, stream_pb2.Result]] = []
    options = StreamOptions(target=server.target, model="lesion-unet", realtime=False, timeout_s=60)
    report = asyncio.run(stream_source(source, options, lambda f, r: answers.append((f, r))))

    assert report.sent == 24
    assert [r.seq for _, r in answers] == list(range(24))
    scores = []
    for source_frame, result in answers:
        assert result.status.code == OK, result.status.reason
        assert {t.stage for t in result.timings} == SERVER_STAGES
        assert all(t.duration_ns >= 0 for t in result.timings)
        assert result.provenance.sha256 == example_bundle.onnx_sha256
        assert result.provenance.backend == "onnxruntime"
        assert result.provenance.precision == manifest_pb2.PRECISION_FP32
        mask = decode_mask(result.outputs[0].mask)
        assert mask.shape == source_frame.pixels.shape[:2]
        area = {q.name: q for q in result.quantities}["lesion_area"]
        assert area.unit == "mm2"
        assert area.value == pytest.approx(int((mask > 0).sum()) * 0.3 * 0.3)
        scores.append(dice(mask, truth[source_frame.index]))
    # The served model finds the simulated lesions, through the whole pipeline.
    assert float(np.mean(scores)) > 0.6
    assert report.latency.errors == 0 and report.latency.dropped == 0


def test_bad_frames_get_error_results_and_the_stream_goes_on(server: ServerThread) -> None:
    short = _frame(1)
    short.raw.data = short.raw.data[:-1]
    corrupt = stream_pb2.Frame(
        stream_id="t",
        seq=2,
        model="lesion-unet",
        encoded=stream_pb2.EncodedImage(encoding=stream_pb2.ENCODING_PNG, data=b"not a png"),
    )
    unknown = _frame(3, model="no-such-model")
    frames = [_frame(0), short, corrupt, unknown, _frame(4)]
    with grpc.insecure_channel(server.target) as channel:
        results = list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=60))
    assert [r.seq for r in results] == [0, 1, 2, 3, 4]
    assert [r.status.code for r in results] == [OK, ERROR, ERROR, ERROR, OK]
    assert "needs" in results[1].status.reason
    assert "could not be decoded" in results[2].status.reason
    assert "no-such-model" in results[3].status.reason and "lesion-unet" in results[3].status.reason


def test_concurrent_streams_each_get_their_own_answers(server: ServerThread) -> None:
    async def both() -> list[list[int]]:
        seen: list[list[int]] = [[], []]
        runs = [
            stream_source(
                SyntheticUltrasoundSource(seed=seed, n_frames=10),
                StreamOptions(
                    target=server.target, model="lesion-unet", realtime=False, stream_id=f"s{seed}", timeout_s=60
                ),
                lambda _f, r, seed=seed: seen[seed].append(r.seq) if r.stream_id == f"s{seed}" else None,
            )
            for seed in (0, 1)
        ]
        await asyncio.gather(*runs)
        return seen

    assert asyncio.run(both()) == [list(range(10)), list(range(10))]


def test_unary_calls_map_errors_to_status_codes(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        assert stub.Infer(_frame(0), timeout=30).status.code == OK

        bad = _frame(1)
        bad.raw.width = 0
        with pytest.raises(grpc.RpcError) as invalid:
            stub.Infer(bad, timeout=30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in (invalid.value.details() or "")

        with pytest.raises(grpc.RpcError) as missing:
            stub.Infer(_frame(2, model="nope"), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.RpcError) as unnamed:
            stub.GetModel(stream_pb2.GetModelRequest(), timeout=30)
        assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unknown:
            stub.GetModel(stream_pb2.GetModelRequest(name="nope"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        info = stub.GetModel(stream_pb2.GetModelRequest(name="lesion-unet"), timeout=30)
        assert info.ready and info.manifest.task == manifest_pb2.TASK_SEGMENTATION
        assert [m.name for m in stub.ListModels(stream_pb2.ListModelsRequest(), timeout=30).models] == ["lesion-unet"]


def test_frames_larger_than_the_grpc_default_limit_pass(server: ServerThread) -> None:
    # 1920x1080 RGB is 6.2 MB, over gRPC's 4 MiB default; both ends raise the limit.
    pixels = np.zeros((1080, 1920, 3), dtype=np.uint8)
    cv2.circle(pixels, (960, 540), 200, (200, 200, 200), -1)
    frame = build_frame(
        SourceFrame(0, pixels, 0.0, None), 0, StreamOptions(target="", model="lesion-unet"), "endoscopy"
    )
    assert frame.ByteSize() > 4 * 1024 * 1024
    with grpc.insecure_channel(server.target, options=channel_options(64 * 1024 * 1024)) as channel:
        result = stream_pb2_grpc.StreamServiceStub(channel).Infer(frame, timeout=60)
    assert result.status.code == OK
    assert (result.outputs[0].mask.height, result.outputs[0].mask.width) == (1080, 1920)


def test_health_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgescope.v1.StreamService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflect.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert "edgescope.v1.StreamService" in names
