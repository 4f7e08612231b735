"""Real-time scheduling over a real server: live/every policies, deadlines, batching, reload, pull mode."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server.capture import CaptureConfig
from edgescope.runtime.server.registry import WorkerOptions
from edgescope.runtime.server.security import SecurityConfig
from edgescope.runtime.server.statistics import StatisticsSnapshot
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread

OK = stream_pb2.FRAME_STATUS_CODE_OK
DROPPED = stream_pb2.FRAME_STATUS_CODE_DROPPED
PIXELS = encode_raw((np.random.default_rng(0).random((240, 320)) * 255).astype(np.uint8))


def _frame(seq: int, **fields: object) -> stream_pb2.Frame:
    return stream_pb2.Frame(stream_id="s", seq=seq, raw=PIXELS, **fields)  # type: ignore[arg-type]


async def _frames(count: int, interval_s: float = 0.0, **fields: object) -> AsyncIterator[stream_pb2.Frame]:
    for seq in range(count):
        yield _frame(seq, **fields)
        if interval_s:
            await asyncio.sleep(interval_s)


async def _stream(
    target: str, frames: AsyncIterator[stream_pb2.Frame], read_delay_s: float = 0.0
) -> list[stream_pb2.Result]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = stream_pb2_grpc.StreamServiceStub(channel).Stream(frames, timeout=120)
        results = []
        async for result in call:
            results.append(result)
            if read_delay_s:
                await asyncio.sleep(read_delay_s)
        return results


@pytest.fixture(scope="module")
def batching_server(example_bundle: Bundle) -> Iterator[ServerThread]:
    running = ServerThread(
        [example_bundle.path],
        models=WorkerOptions(max_batch=8, batch_delay_s=0.004),
        security=SecurityConfig(model_repository=example_bundle.path.parent),
    )
    try:
        yield running
    finally:
        running.stop()


def test_live_answers_every_frame_and_drops_only_stale_ones(server: ServerThread) -> None:
    results = asyncio.run(_stream(server.target, _frames(60, policy=stream_pb2.STREAM_POLICY_LIVE)))
    assert [r.seq for r in results] == list(range(60))
    codes = [r.status.code for r in results]
    stale = [r for r in results if r.status.code == DROPPED]
    assert stale, "60 frames sent at once must overrun a ~10 ms model"
    assert all(r.status.drop_reason == stream_pb2.DROP_REASON_STALE for r in stale)
    assert codes[-1] == OK  # nothing newer arrived: the newest frame always runs
    assert set(codes) <= {OK, DROPPED}


def test_every_processes_all_frames_in_order_under_a_slow_consumer(server: ServerThread) -> None:
    results = asyncio.run(_stream(server.target, _frames(30, policy=stream_pb2.STREAM_POLICY_EVERY), read_delay_s=0.02))
    assert [r.seq for r in results] == list(range(30))
    assert all(r.status.code == OK for r in results)


def test_deadline_drops_or_flags_late(server: ServerThread) -> None:
    strict = asyncio.run(_stream(server.target, _frames(20, deadline_ms=1)))
    assert [r.seq for r in strict] == list(range(20))
    reasons = {r.status.drop_reason for r in strict if r.status.code == DROPPED}
    assert reasons == {stream_pb2.DROP_REASON_DEADLINE}

    lenient = asyncio.run(_stream(server.target, _frames(20, deadline_ms=1, process_late=True)))
    assert all(r.status.code == OK for r in lenient)
    assert any(r.status.late for r in lenient)


def _residence_ms(result: stream_pb2.Result) -> float:
    return (result.server_send_time_ns - result.server_receive_time_ns) / 1e6


@pytest.mark.parametrize("process_late", [False, True])
def test_no_answer_leaves_after_its_deadline_unflagged(server: ServerThread, process_late: bool) -> None:
    # 40 frames at once against a budget of a few inferences: some finish in time, later ones cannot.
    budget_ms = 25
    results = asyncio.run(_stream(server.target, _frames(40, deadline_ms=budget_ms, process_late=process_late)))
    assert [r.seq for r in results] == list(range(40))
    ok = [r for r in results if r.status.code == OK]
    over = [r for r in ok if _residence_ms(r) > budget_ms]
    if process_late:
        assert len(ok) == 40
        assert over, "the budget must be overrun for this test to mean anything"
        assert all(r.status.late for r in over)
    else:
        assert over == [], [round(_residence_ms(r), 1) for r in over]
        assert any(r.status.drop_reason == stream_pb2.DROP_REASON_DEADLINE for r in results)


def test_two_models_on_one_frame_answer_as_one_result(server: ServerThread, example_bundle: Bundle) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        stub.LoadModel(stream_pb2.LoadModelRequest(bundle=example_bundle.path.name, name="second"), timeout=60)
        try:
            frames = [_frame(i, model="lesion-unet", extra_models=["second"]) for i in range(3)]
            results = list(stub.Stream(iter(frames), timeout=60))
        finally:
            stub.UnloadModel(stream_pb2.UnloadModelRequest(name="second"), timeout=30)
    for result in results:
        assert result.status.code == OK
        assert result.provenance.model == "lesion-unet"
        (extra,) = result.model_results
        assert extra.model == "second" and extra.status.code == OK
        # Same bundle, same frame: the second model's mask equals the first's.
        assert extra.outputs[0].mask.png == result.outputs[0].mask.png


def test_eight_streams_on_two_models_are_batched(batching_server: ServerThread, example_bundle: Bundle) -> None:
    with grpc.insecure_channel(batching_server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        stub.LoadModel(stream_pb2.LoadModelRequest(bundle=example_bundle.path.name, name="twin"), timeout=60)

    async def run_all() -> list[list[stream_pb2.Result]]:
        streams = []
        for index in range(8):
            model = "lesion-unet" if index % 2 else "twin"

            async def frames(index: int = index, model: str = model) -> AsyncIterator[stream_pb2.Frame]:
                for seq in range(12):
                    yield stream_pb2.Frame(stream_id=f"s{index}", seq=seq, model=model, raw=PIXELS)

            streams.append(_stream(batching_server.target, frames()))
        return await asyncio.gather(*streams)

    for results in asyncio.run(run_all()):
        assert [r.seq for r in results] == list(range(12))
        assert all(r.status.code == OK for r in results)
    stats = {model.name: model.statistics.snapshot() for model in batching_server.running.registry.all()}
    assert set(stats) == {"lesion-unet", "twin"}
    for name, figures in stats.items():
        assert figures.inference_count == 48 and figures.fail.count == 0, name
        # Frames of concurrent streams share inferences: fewer executions than frames, batches above one.
        assert figures.execution_count < 48 and max(figures.batches) > 1, name


def test_a_streams_first_frame_runs_alone_and_its_later_frames_in_batches(batching_server: ServerThread) -> None:
    (model,) = [model for model in batching_server.running.registry.all() if model.name == "lesion-unet"]
    before = model.statistics.snapshot()

    async def frames(index: int, count: int) -> AsyncIterator[stream_pb2.Frame]:
        for seq in range(count):
            yield stream_pb2.Frame(stream_id=f"new-{index}", seq=seq, model="lesion-unet", raw=PIXELS)

    async def run_all(count: int) -> list[list[stream_pb2.Result]]:
        return await asyncio.gather(*(_stream(batching_server.target, frames(index, count)) for index in range(8)))

    def sizes_since(snapshot: StatisticsSnapshot) -> dict[int, int]:
        counts = {size: figures.compute_infer.count for size, figures in model.statistics.snapshot().batches.items()}
        for size, figures in snapshot.batches.items():
            counts[size] -= figures.compute_infer.count
        return {size: count for size, count in counts.items() if count}

    for results in asyncio.run(run_all(1)):
        assert [r.status.code for r in results] == [OK]
    # Eight new streams at once, one frame each: eight runs of one, no batch a running stream could wait for.
    assert sizes_since(before) == {1: 8}
    before = model.statistics.snapshot()
    for results in asyncio.run(run_all(6)):
        assert [r.status.code for r in results] == [OK] * 6
    assert max(sizes_since(before)) > 1


def test_reload_mid_stream_loses_nothing(server: ServerThread, example_bundle: Bundle) -> None:
    v2 = example_bundle.path.parent / "lesion-unet-v2"  # in the server's model repository
    shutil.copytree(example_bundle.path, v2, dirs_exist_ok=True)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest["version"] = "2"
    (v2 / "manifest.json").write_text(json.dumps(manifest))

    async def run() -> list[stream_pb2.Result]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = stream_pb2_grpc.StreamServiceStub(channel)
            stream = asyncio.create_task(_stream(server.target, _frames(60, interval_s=0.01, model="lesion-unet")))
            await asyncio.sleep(0.2)
            await stub.LoadModel(stream_pb2.LoadModelRequest(bundle=v2.name, name="lesion-unet"), timeout=60)
            results = await stream
            await stub.LoadModel(stream_pb2.LoadModelRequest(bundle=example_bundle.path.name), timeout=60)
            return results

    results = asyncio.run(run())
    assert [r.seq for r in results] == list(range(60))
    assert all(r.status.code == OK for r in results)
    versions = [r.provenance.version for r in results]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions)  # once switched, new frames stay on the new version


def test_model_lifecycle_errors(server: ServerThread, example_bundle: Bundle) -> None:
    (example_bundle.path.parent / "not-a-bundle").mkdir(exist_ok=True)
    with grpc.insecure_channel(server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.UnloadModel(stream_pb2.UnloadModelRequest(name="nope"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            stub.LoadModel(stream_pb2.LoadModelRequest(bundle="not-a-bundle"), timeout=10)
        assert bad.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "manifest.json" in (bad.value.details() or "")


def test_pull_mode_subscribers_see_the_same_results(example_bundle: Bundle) -> None:
    capture = CaptureConfig(name="probe", source="synthetic:ultrasound?fps=30", model="lesion-unet", loop=False)
    running = ServerThread([example_bundle.path], captures=[capture])
    try:

        async def collect(stub: stream_pb2_grpc.StreamServiceStub) -> dict[int, stream_pb2.Result]:
            call = stub.Subscribe(stream_pb2.SubscribeRequest(capture="probe"), timeout=60)
            seen: dict[int, stream_pb2.Result] = {}
            async for result in call:
                seen[result.seq] = result
                if len(seen) == 20:
                    call.cancel()
                    break
            return seen

        async def subscribe() -> list[dict[int, stream_pb2.Result]]:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = stream_pb2_grpc.StreamServiceStub(channel)
                return await asyncio.gather(collect(stub), collect(stub))

        first, second = asyncio.run(subscribe())
        common = sorted(set(first) & set(second))
        assert len(common) >= 10
        for seq in common:
            assert first[seq] == second[seq]
        # A live capture answers every frame: a result, or stale when a newer frame overtook it on a busy machine.
        codes = [(r.status.code, r.status.drop_reason) for r in first.values()]
        assert set(codes) <= {(OK, 0), (DROPPED, stream_pb2.DROP_REASON_STALE)}
        assert (OK, 0) in codes
        # The capture's answers are counted like any stream's, under its own stream id.
        assert running.running.telemetry is not None
        assert running.running.telemetry.metrics.preview("capture:probe") is not None
    finally:
        running.stop()
