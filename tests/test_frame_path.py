"""A frame's path: one hand-off into its model's worker and one out, and a server warmed before it serves."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.errors import FrameError
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server import stages
from edgescope.runtime.server.workers import Job, JobResult, ModelWorker, SessionFailed, as_is
from edgescope.v1 import stream_pb2, stream_pb2_grpc

from .conftest import ServerThread
from .test_workers import GuardedSession

PIXELS = encode_raw(np.random.default_rng(0).integers(0, 255, (96, 128), dtype=np.uint8))


@pytest.fixture
def threads_seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(step, thread name) for every prepare and finish of a frame of stream "path" or of the warm-up."""
    seen: list[tuple[str, str]] = []
    prepare, finish = stages.FrameJob.prepare, stages.FrameJob.finish

    def watched_prepare(self: stages.FrameJob) -> np.ndarray:  # type: ignore[type-arg]
        if self.frame.stream_id in ("path", "warm-up"):
            seen.append(("prepare", threading.current_thread().name))
        return prepare(self)

    def watched_finish(self: stages.FrameJob, inferred: JobResult) -> stages.Finished:
        if self.frame.stream_id in ("path", "warm-up"):
            seen.append(("finish", threading.current_thread().name))
        return finish(self, inferred)

    monkeypatch.setattr(stages.FrameJob, "prepare", watched_prepare)
    monkeypatch.setattr(stages.FrameJob, "finish", watched_finish)
    return seen


def test_a_streamed_frame_is_prepared_and_finished_on_the_instance_thread_that_infers_it(
    example_bundle: Bundle, threads_seen: list[tuple[str, str]]
) -> None:
    served = ServerThread([example_bundle.path])
    threads_seen.clear()  # the server's own warm-up frames went this way too

    async def run() -> list[stream_pb2.Result]:
        async def frames() -> AsyncIterator[stream_pb2.Frame]:
            for seq in range(6):
                yield stream_pb2.Frame(stream_id="path", seq=seq, raw=PIXELS)

        async with grpc.aio.insecure_channel(served.target) as channel:
            return [r async for r in stream_pb2_grpc.StreamServiceStub(channel).Stream(frames())]

    try:
        results = asyncio.run(run())
    finally:
        served.stop()
    assert [r.status.code for r in results] == [stream_pb2.FRAME_STATUS_CODE_OK] * 6
    assert [step for step, _ in threads_seen] == ["prepare", "finish"] * 6
    # The model's instance thread, the one that owns its session: no frame thread, no event loop in between.
    assert {name for _, name in threads_seen} == {"edgescope-lesion-unet-0"}
    assert all("queue" in [t.stage for t in r.timings] for r in results)


def _worker() -> ModelWorker:
    worker = ModelWorker("fake", GuardedSession)
    worker.start()
    return worker


def test_a_job_whose_own_steps_fail_is_answered_with_that_error_not_as_a_session_failure() -> None:
    worker = _worker()

    def bad_input() -> np.ndarray:  # type: ignore[type-arg]
        raise FrameError("this frame cannot be decoded")

    def bad_finish(_result: JobResult) -> JobResult:
        raise FrameError("this frame's outputs cannot be encoded")

    def good(value: float) -> Job[JobResult]:
        return Job(lane=f"l{value}", finish=as_is, prepare=lambda: np.full((1, 4), value, np.float32), frame_input="x")

    async def run() -> list[object]:
        jobs = [
            Job(lane="a", finish=as_is, prepare=bad_input, frame_input="x"),
            good(1.0),
            Job(lane="b", finish=bad_finish, prepare=lambda: np.ones((1, 4), np.float32), frame_input="x"),
            good(3.0),
        ]
        return await asyncio.gather(*(worker.infer(job) for job in jobs), return_exceptions=True)

    try:
        first, second, third, fourth = asyncio.run(run())
    finally:
        worker.retire()
        assert worker.join(10)
    # The frame's fault stays the frame's: a fallback is tried only when the session itself failed.
    assert isinstance(first, FrameError) and not isinstance(first, SessionFailed)
    assert isinstance(third, FrameError) and "encoded" in str(third)
    assert isinstance(second, JobResult) and float(second.outputs["y"][0, 0]) == 2.0
    assert isinstance(fourth, JobResult) and float(fourth.outputs["y"][0, 0]) == 6.0


def test_a_failed_inference_is_a_session_failure() -> None:
    worker = _worker()
    job = Job(lane="a", finish=as_is, tensor=np.full((1, 4), np.nan, np.float32), frame_input="x")
    try:
        with pytest.raises(SessionFailed, match="NaN"):
            asyncio.run(worker.infer(job))
    finally:
        worker.retire()
        assert worker.join(10)


def test_the_server_warms_each_model_before_serving_and_counts_only_clients_frames(
    example_bundle: Bundle, threads_seen: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edgescope.runtime.server.warmup"):
        served = ServerThread([example_bundle.path])
    try:
        # Frames at the input size and at twice it went the whole way on the instance thread.
        assert [step for step, _ in threads_seen] == ["prepare", "finish"] * 8
        assert any("warmed up lesion-unet" in record.getMessage() for record in caplog.records)
        (model,) = served.running.registry.all()
        figures = model.statistics.snapshot()
        assert figures.inference_count == 0 and figures.execution_count == 0
    finally:
        served.stop()
