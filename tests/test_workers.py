"""The model worker: sessions used by one caller at a time, fair lanes, batches that fail only the bad frame.

The sessions here are fakes shaped like the real ones: ``GuardedSession``
fails loudly if two callers are inside it at once or if a thread other than
the one that opened it calls it (TensorRT sets the CUDA device per thread);
``SharedBufferSession`` holds one input buffer, like a TensorRT execution
context with its one set of bindings, so callers that overlap get each
other's answers.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
import pytest

from edgescope.errors import BackendError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
from edgescope.runtime.server.workers import Job, JobResult, ModelWorker, as_is
from edgescope.v1 import manifest_pb2

MANIFEST = manifest_pb2.ModelManifest(name="fake")


class SessionMisuse(AssertionError):
    """A session was entered by two callers at once, or by a thread that did not open it."""


class GuardedSession(Session):
    backend_name = "guarded"

    def __init__(self, delay_s: float = 0.0, max_concurrency: int | None = 1) -> None:
        super().__init__(MANIFEST)
        self.owner = threading.get_ident()
        self._inside = threading.Lock()
        self._delay_s = delay_s
        self._max_concurrency = max_concurrency
        self.calls = 0
        self.closed_at = 0.0
        self.finished_at = 0.0

    @property
    def capabilities(self) -> SessionCapabilities:
        return SessionCapabilities(False, False, "cpu", max_concurrency=self._max_concurrency)

    def _infer_impl(self, feed: Feed) -> Outputs:
        if self._max_concurrency == 1 and threading.get_ident() != self.owner:
            raise SessionMisuse("called from a thread that did not open the session")
        if not self._inside.acquire(blocking=False):
            raise SessionMisuse("two callers inside one session")
        try:
            x = np.asarray(feed["x"], dtype=np.float32)
            if not np.isfinite(x).all():
                raise ValueError("input holds NaN")
            time.sleep(self._delay_s)
            self.calls += 1
            return {"y": x * 2.0}
        finally:
            self.finished_at = time.monotonic()
            self._inside.release()

    def _close_impl(self) -> None:
        if threading.get_ident() != self.owner:
            raise SessionMisuse("closed from a thread that did not open it")
        self.closed_at = time.monotonic()


class SharedBufferSession(Session):
    """One buffer for the input, read back after a pause: overlapping callers swap answers."""

    backend_name = "shared-buffer"

    def __init__(self) -> None:
        super().__init__(MANIFEST)
        self._buffer = np.zeros((1, 4), np.float32)

    @property
    def capabilities(self) -> SessionCapabilities:
        return SessionCapabilities(False, True, "cuda:0", max_concurrency=1)

    def _infer_impl(self, feed: Feed) -> Outputs:
        self._buffer[...] = feed["x"]
        time.sleep(0.002)  # the kernel runs; another caller may overwrite the binding meanwhile
        return {"y": self._buffer * 2.0}

    def _close_impl(self) -> None:
        pass


def _job(
    lane: str, value: float, *, batchable: bool = False, live: bool = False, opening: bool = False
) -> Job[JobResult]:
    tensor = np.full((1, 4), value, np.float32)
    return Job(lane=lane, finish=as_is, tensor=tensor, frame_input="x", batchable=batchable, live=live, opening=opening)


def _worker(factory: Callable[[], Session], **options: int | float) -> ModelWorker:
    worker = ModelWorker("fake", factory, **options)  # type: ignore[arg-type]
    worker.start()
    return worker


def _stop(worker: ModelWorker) -> None:
    worker.retire()
    assert worker.join(10)


async def _run_all(worker: ModelWorker, jobs: list[Job[JobResult]]) -> list[object]:
    return await asyncio.gather(*(worker.infer(job) for job in jobs), return_exceptions=True)


def test_the_shared_buffer_session_swaps_answers_when_callers_overlap() -> None:
    # The detector works: called from two threads at once, it gives a frame another frame's answer.
    session = SharedBufferSession()
    answers: dict[float, float] = {}

    def call(value: float) -> None:
        for _ in range(20):
            out = session.infer({"x": np.full((1, 4), value, np.float32)})["y"]
            answers[value] = min(answers.get(value, np.inf), float(out[0, 0]))

    threads = [threading.Thread(target=call, args=(v,)) for v in (1.0, 100.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers[100.0] == 2.0  # frame 100 once got frame 1's answer


@pytest.mark.parametrize("instances", [1, 3])
def test_every_job_gets_its_own_answer_through_a_shared_buffer_session(instances: int) -> None:
    worker = _worker(SharedBufferSession, instances=instances)
    try:
        jobs = [_job(f"lane-{i % 8}", float(i)) for i in range(64)]
        results = asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    for job, result in zip(jobs, results, strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.outputs["y"], job.tensor * 2.0)  # type: ignore[attr-defined]


def test_sessions_are_opened_run_and_closed_on_their_own_thread_one_caller_at_a_time() -> None:
    sessions: list[GuardedSession] = []

    def open_session() -> Session:
        sessions.append(GuardedSession(delay_s=0.001))
        return sessions[-1]

    worker = _worker(open_session, instances=3)
    try:
        results = asyncio.run(_run_all(worker, [_job(f"lane-{i % 5}", float(i)) for i in range(90)]))
    finally:
        _stop(worker)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert len(sessions) == 3
    assert len({s.owner for s in sessions}) == 3
    assert sum(s.calls for s in sessions) == 90
    assert all(s.closed_at > 0 for s in sessions)


def test_a_session_that_takes_every_caller_is_shared_by_the_instances() -> None:
    opened: list[GuardedSession] = []

    def open_session() -> Session:
        opened.append(GuardedSession(max_concurrency=None))
        return opened[-1]

    worker = _worker(open_session, instances=4)
    _stop(worker)
    assert len(opened) == 1 and opened[0].closed_at > 0


def test_lanes_are_served_round_robin() -> None:
    gate = threading.Event()
    order: list[str] = []

    class Gated(GuardedSession):
        def _infer_impl(self, feed: Feed) -> Outputs:
            gate.wait(10)
            order.append(str(int(np.asarray(feed["x"])[0, 0])))
            return super()._infer_impl(feed)

    worker = _worker(Gated)

    async def scenario() -> None:
        busy = [asyncio.ensure_future(worker.infer(_job("busy", 1.0))) for _ in range(10)]
        await asyncio.sleep(0.05)  # the first is running, nine wait in the busy lane
        other = asyncio.ensure_future(worker.infer(_job("other", 2.0)))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*busy, other)

    try:
        asyncio.run(scenario())
    finally:
        _stop(worker)
    # The other lane's job ran right after the one already running, not after the nine waiting.
    assert order.index("2") <= 2, order


def _recording(order: list[float], gate: threading.Event, delay_s: float = 0.0) -> type[GuardedSession]:
    """A session that holds every call until ``gate`` opens, recording each input's first value."""

    class Recording(GuardedSession):
        def __init__(self) -> None:
            super().__init__(delay_s=delay_s)

        def _infer_impl(self, feed: Feed) -> Outputs:
            gate.wait(10)
            order.append(float(np.asarray(feed["x"])[0, 0]))
            return super()._infer_impl(feed)

    return Recording


def test_an_idle_worker_keeps_nothing_of_the_frames_it_ran() -> None:
    # A 1080p frame is 6 MB: the instance thread must not hold its last batch while it waits for the next.
    class Frame:
        def finish(self, result: JobResult) -> JobResult:
            return result

    worker = _worker(GuardedSession)
    try:
        frame = Frame()
        gone = weakref.ref(frame)
        job = Job(lane="a", finish=frame.finish, tensor=np.ones((1, 4), np.float32), frame_input="x")
        asyncio.run(_run_all(worker, [job]))
        del frame, job
        for _ in range(50):
            gc.collect()
            if gone() is None:
                break
            time.sleep(0.02)
        assert gone() is None, "the worker still holds a frame it has answered"
    finally:
        _stop(worker)


def test_a_live_frame_runs_before_requests_that_waited_longer() -> None:
    gate, order = threading.Event(), []  # type: ignore[var-annotated]
    worker = _worker(_recording(order, gate))

    async def scenario() -> None:
        requests = [asyncio.ensure_future(worker.infer(_job(f"client-{i}", 1.0))) for i in range(6)]
        await asyncio.sleep(0.05)  # the first is running, five wait
        live = asyncio.ensure_future(worker.infer(_job("stream", 2.0, live=True)))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*requests, live)

    try:
        asyncio.run(scenario())
    finally:
        _stop(worker)
    assert order.index(2.0) == 1, order


def test_a_stream_between_frames_runs_next_when_its_frame_comes_however_busy_the_others() -> None:
    order: list[float] = []
    third_call, go_on = threading.Event(), threading.Event()

    class HeldAtThird(GuardedSession):
        def _infer_impl(self, feed: Feed) -> Outputs:
            order.append(float(np.asarray(feed["x"])[0, 0]))
            if len(order) == 3:
                third_call.set()
                go_on.wait(10)
            return super()._infer_impl(feed)

    worker = _worker(HeldAtThird)

    async def scenario() -> None:
        busy = [asyncio.ensure_future(worker.infer(_job(f"busy-{i % 2}", 1.0, live=True))) for i in range(10)]
        await asyncio.to_thread(third_call.wait, 10)  # both busy lanes have had turns; more wait in each
        sparse = asyncio.ensure_future(worker.infer(_job("sparse", 2.0, live=True)))
        await asyncio.sleep(0.05)
        go_on.set()
        await asyncio.gather(*busy, sparse)

    try:
        asyncio.run(scenario())
    finally:
        _stop(worker)
    # Round-robin would have put it behind the next frame of each busy lane.
    assert order.index(2.0) == 3, order


def _order_of_waves(waves: list[list[Job[JobResult]]]) -> list[float]:
    """The order a held worker runs ``waves`` of jobs in: the first wave's first job runs and is held
    while the rest of the waves are queued one after another, then all go."""
    gate, order = threading.Event(), []  # type: ignore[var-annotated]
    worker = _worker(_recording(order, gate))

    async def scenario() -> None:
        waiting = []
        for wave in waves:
            waiting += [asyncio.ensure_future(worker.infer(job)) for job in wave]
            await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*waiting)

    try:
        asyncio.run(scenario())
    finally:
        _stop(worker)
    return order


def _burst() -> list[Job[JobResult]]:
    """Eight new streams' first frames (value 1.0)."""
    return [_job(f"host/new-{i}", 1.0, live=True, opening=True) for i in range(8)]


def test_a_running_streams_frame_goes_before_the_first_frames_of_a_burst_of_new_streams() -> None:
    # It runs (held), a burst of new streams' first frames comes, then its next frame.
    order = _order_of_waves([[_job("host/running", 2.0, live=True)], _burst(), [_job("host/running", 3.0, live=True)]])
    # Without the tie going to the running stream, its next frame waited for all eight.
    assert order.index(3.0) == 1, order


def test_a_burst_of_new_streams_counts_as_one_lane_against_a_running_stream() -> None:
    running = [_job("host/running", 2.0, live=True) for _ in range(3)]
    order = _order_of_waves([[_job("host/other", 0.0, live=True)], _burst() + running])
    # Turn about with the first frames; as eight lanes they would have gone between its first and second.
    assert order[1:7] == [2.0, 1.0, 2.0, 1.0, 2.0, 1.0], order


def test_a_client_with_many_streams_shares_one_clients_part_of_the_model() -> None:
    gate, order = threading.Event(), []  # type: ignore[var-annotated]
    gate.set()
    worker = _worker(_recording(order, gate, delay_s=0.002))
    many = [_job(f"anonymous@ipv4:10.0.0.1/stream-{i % 3}", 1.0, live=True) for i in range(30)]
    one = [_job("anonymous@ipv4:10.0.0.2/stream-1", 2.0, live=True) for _ in range(15)]
    try:
        asyncio.run(_run_all(worker, many + one))
    finally:
        _stop(worker)
    # Per stream, the lone stream would have had a quarter of the turns while all four waited.
    assert 8 <= order[:20].count(2.0) <= 12, order


def test_requests_keep_a_quarter_of_the_model_while_live_frames_wait_too() -> None:
    gate, order = threading.Event(), []  # type: ignore[var-annotated]
    gate.set()
    worker = _worker(_recording(order, gate, delay_s=0.004))
    jobs = [_job(f"stream-{i % 3}", 1.0, live=True) for i in range(60)] + [_job("client", 2.0) for _ in range(60)]
    try:
        asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    # While both classes waited (the first 60 runs), requests had about one run in four: never starved,
    # never more than their share.
    share = order[:60].count(2.0) / 60
    assert 0.15 <= share <= 0.35, order


def test_a_live_frames_batch_takes_no_request_as_company() -> None:
    sizes: list[int] = []
    worker = _worker(_batching(sizes), max_batch=8, batch_delay_s=0.05)
    jobs = [_job("stream-a", 1.0, batchable=True, live=True), _job("stream-b", 2.0, batchable=True, live=True)]
    jobs += [_job(f"client-{i}", 3.0, batchable=True) for i in range(3)]
    try:
        results = asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    assert all(isinstance(result, JobResult) for result in results)
    assert sorted(sizes) == [2, 3], sizes


def _batching(sizes: list[int]) -> type[GuardedSession]:
    """A session that takes batches, recording the size of each."""

    class Batching(GuardedSession):
        @property
        def capabilities(self) -> SessionCapabilities:
            return SessionCapabilities(True, False, "cpu", max_concurrency=1)

        def _infer_impl(self, feed: Feed) -> Outputs:
            sizes.append(int(np.asarray(feed["x"]).shape[0]))
            return super()._infer_impl(feed)

    return Batching


def test_a_requesters_own_frames_never_share_a_batch() -> None:
    # A stream's next frame waits behind this one; batched together, this one would wait for it.
    sizes: list[int] = []
    worker = _worker(_batching(sizes), max_batch=8, batch_delay_s=0.05)
    jobs = [_job("one-stream", float(i), batchable=True) for i in range(4)] + [_job("other", 9.0, batchable=True)]
    try:
        results = asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    assert all(isinstance(result, JobResult) for result in results)
    assert sorted(sizes) == [1, 1, 1, 2], sizes


def test_a_bad_frame_in_a_batch_fails_only_itself() -> None:
    sizes: list[int] = []
    worker = _worker(_batching(sizes), max_batch=8, batch_delay_s=0.05)
    jobs = [_job(f"lane-{i}", float(i), batchable=True) for i in range(6)]
    bad = _job("lane-bad", float("nan"), batchable=True)
    try:
        results = asyncio.run(_run_all(worker, [*jobs, bad]))
    finally:
        _stop(worker)
    assert isinstance(results[-1], BackendError) and "NaN" in str(results[-1])
    for job, result in zip(jobs, results[:-1], strict=True):
        np.testing.assert_array_equal(result.outputs["y"], job.tensor * 2.0)  # type: ignore[attr-defined]
    assert max(sizes) == 7, "the seven frames were tried as one batch first"
    figures = worker.statistics.snapshot()
    assert figures.fail.count == 1 and figures.success.count == 6


def test_retiring_waits_for_the_running_job_before_closing() -> None:
    sessions: list[GuardedSession] = []

    def open_session() -> Session:
        sessions.append(GuardedSession(delay_s=0.3))
        return sessions[-1]

    worker = _worker(open_session)

    async def scenario() -> object:
        running = asyncio.ensure_future(worker.infer(_job("a", 3.0)))
        await asyncio.sleep(0.05)
        worker.retire()  # as an unload does while a frame is in inference
        with pytest.raises(BackendError, match="being unloaded"):
            await worker.infer(_job("b", 1.0))
        return await running

    result = asyncio.run(scenario())
    assert worker.join(10)
    np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), 6.0))  # type: ignore[attr-defined]
    (session,) = sessions
    assert session.closed_at >= session.finished_at > 0


def test_a_cancelled_job_that_has_not_started_never_runs() -> None:
    gate = threading.Event()
    seen: list[float] = []

    class Gated(GuardedSession):
        def _infer_impl(self, feed: Feed) -> Outputs:
            gate.wait(10)
            seen.append(float(np.asarray(feed["x"])[0, 0]))
            return super()._infer_impl(feed)

    worker = _worker(Gated)

    async def scenario() -> None:
        first = asyncio.ensure_future(worker.infer(_job("a", 1.0)))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(worker.infer(_job("b", 2.0)))
        await asyncio.sleep(0.05)
        doomed.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await doomed

    try:
        asyncio.run(scenario())
    finally:
        _stop(worker)
    assert seen == [1.0]


def test_a_session_that_fails_to_open_fails_the_start() -> None:
    def broken() -> Session:
        raise BackendError("no such engine")

    worker = ModelWorker("fake", broken, instances=2)
    with pytest.raises(BackendError, match="no such engine"):
        worker.start()
    assert worker.join(5)


def test_a_fault_outside_the_model_answers_its_jobs_and_the_instance_serves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = _worker(GuardedSession)
    record = worker.statistics.record
    failures = iter([RuntimeError("statistics broke")])

    def flaky(**figures: int | bool) -> None:
        if (failure := next(failures, None)) is not None:
            raise failure
        record(**figures)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.statistics, "record", flaky)
    try:
        first = asyncio.run(_run_all(worker, [_job("a", 1.0)]))
        second = asyncio.run(_run_all(worker, [_job("a", 2.0)]))
    finally:
        _stop(worker)
    assert isinstance(first[0], BackendError) and "RuntimeError" in str(first[0])
    assert isinstance(second[0], JobResult) and float(second[0].outputs["y"][0, 0]) == 4.0
    assert worker.faults == 1


def _rows_job(lane: str, rows: int, value: float) -> Job[JobResult]:
    tensor = np.full((rows, 4), value, np.float32)
    return Job(lane=lane, finish=as_is, tensor=tensor, frame_input="x", batchable=True, inferences=rows)


def test_requests_of_several_rows_share_a_batch_and_each_gets_its_own_rows_back() -> None:
    sizes: list[int] = []
    worker = _worker(_batching(sizes), max_batch=8, batch_delay_s=0.05)
    jobs = [_rows_job("a", 3, 1.0), _rows_job("b", 1, 2.0), _rows_job("c", 4, 3.0), _rows_job("d", 2, 4.0)]
    try:
        results = asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    for job, result in zip(jobs, results, strict=True):
        assert isinstance(result, JobResult)
        np.testing.assert_array_equal(result.outputs["y"], job.tensor * 2.0)  # type: ignore[operator]
    # Eight rows fit one batch; the fourth request's two would make ten.
    assert sizes[0] == 8 and sum(sizes) == 10, sizes


def test_a_batch_whose_outputs_cannot_be_split_by_row_runs_its_jobs_one_by_one() -> None:
    sizes: list[int] = []

    class Pooled(_batching(sizes)):  # type: ignore[misc]
        def _infer_impl(self, feed: Feed) -> Outputs:
            out = super()._infer_impl(feed)
            return {"y": out["y"], "total": np.asarray([float(np.asarray(feed["x"]).sum())], np.float32)}

    worker = _worker(Pooled, max_batch=8, batch_delay_s=0.05)
    jobs = [_rows_job("a", 1, 1.0), _rows_job("b", 1, 2.0)]
    try:
        results = asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    # The pooled output has one row for the whole batch: splitting it would hand one job another's value.
    totals = [float(r.outputs["total"][0]) for r in results if isinstance(r, JobResult)]
    assert totals == [4.0, 8.0] and sizes == [2, 1, 1]


def test_batches_never_exceed_what_the_session_can_take() -> None:
    """A TensorRT engine's profile caps its batch: the worker stacks no more frames than that."""
    sizes: list[int] = []

    class Capped(_batching(sizes)):  # type: ignore[misc]
        @property
        def capabilities(self) -> SessionCapabilities:
            return SessionCapabilities(True, False, "cpu", max_concurrency=1, max_batch=3)

    worker = _worker(Capped, max_batch=8, batch_delay_s=0.05)
    jobs = [_job(f"lane-{i}", float(i), batchable=True) for i in range(7)]
    try:
        results = asyncio.run(_run_all(worker, jobs))
    finally:
        _stop(worker)
    assert all(isinstance(result, JobResult) for result in results)
    assert sum(sizes) == 7 and max(sizes) == 3, sizes
