"""One inference worker per loaded model: the only code that calls a model's sessions.

Triton's instance groups are the model: a worker owns ``instances`` threads,
each holding one session state (for TensorRT: an execution context, a CUDA
stream and its buffers, on a thread that set the device once). A session is
loaded, warmed up, run and closed on its own thread, so no two callers ever
enter one session, whatever calls the model (streams, ``Infer``, KServe,
captures) and whatever happens to the model (reload, unload, shutdown). A
session that declares it can take every instance's calls at once (a client of
a remote server) is shared by the instances instead of opened once per thread.

A job is one hand-off in and one out: the instance thread that runs it also
prepares its input (``Job.prepare``: decode, preprocess) right before the
inference and makes the caller's answer from the outputs (``Job.finish``:
postprocess, encode) right after it, where the data already is; the only
other threads it meets are the submitter's event loop, at both ends.

Everything submits a ``Job`` through ``submit`` (or ``infer``); jobs wait in one bounded queue
(``job_queue``) made of lanes: one per stream, and one per client for all of
its unary calls (a client is a credential on a host, see
``auth.current_client``); live frames go before requests, which keep a
guaranteed share, and lanes of a class are served round-robin. How many jobs
one lane may hold is its owner's bound (a stream's window, ``admission`` for
unary calls); the queue holds at most ``MAX_QUEUED_JOBS``, past which a new
job is refused at once (``OverloadError``) rather than held. Batching is the
worker's policy: jobs that carry one preprocessed frame of a stateless,
dynamic-batch model are stacked across lanes of one class (up to
``max_batch``, waiting at most ``batch_delay_s`` for company); if a batch
fails, its jobs are run one by one so a bad frame fails only itself.

Retiring a worker stops it taking jobs, lets queued and running jobs finish,
then each thread closes its session and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from edgescope.errors import BackendError, DeadlineExpiredError, EdgescopeError, OverloadError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
from edgescope.runtime.pipeline.state import ModelState
from edgescope.runtime.server import job_queue
from edgescope.runtime.server.job_queue import JobQueue
from edgescope.runtime.server.statistics import ModelStatistics
from edgescope.v1 import manifest_pb2, stream_pb2

logger = logging.getLogger(__name__)

# Jobs queued per model across all requesters; beyond this a job is refused.
MAX_QUEUED_JOBS = 256

Tensor = npt.NDArray[np.float32]
T = TypeVar("T")
SessionFactory = Callable[[], Session]
# Runs on each instance's thread right after its session is loaded (warm-up, self-test).
SessionCheck = Callable[[Session], None]


class SessionFailed(BackendError):
    """The session itself failed to run a job (the device, the runtime), not the job's own steps."""


@dataclass(slots=True, eq=False)
class Job(Generic[T]):
    """One request to a model, answered by ``finish(result)`` on the instance thread that ran it.

    The input is ``tensor`` (one preprocessed frame, a batch of one; with
    ``state`` for a stateful model, whose feed the worker builds and whose
    state it updates), made by ``prepare`` on the instance thread when the
    job carries no tensor yet, or ``feed`` (every input, as KServe sends them).
    """

    lane: str
    finish: Callable[[JobResult], T]
    prepare: Callable[[], Tensor] | None = None
    tensor: Tensor | None = None
    frame_input: str = ""
    # A model fed by several sources: the other sources' inputs, filled in by ``prepare``.
    side_inputs: dict[str, Tensor] = field(default_factory=dict)
    state: ModelState | None = None
    reset_state: bool = False
    feed: Feed | None = None
    batchable: bool = False
    # A frame of a live source (a stream or capture), served before requests (see ``job_queue``).
    live: bool = False
    # A stream's first frame: on a tie it waits behind frames of streams already running (see ``job_queue``).
    opening: bool = False
    # Rows of the tensor ``prepare`` will make (2: a frame and its mirror image, flip test-time augmentation).
    rows: int = 1
    # Inferences this job makes (a KServe request of batch 4 makes 4), for the statistics.
    inferences: int = 1
    # Past this (perf_counter ns) the job is answered DeadlineExpiredError instead of run.
    deadline_ns: int | None = None
    enqueued_ns: int = 0
    # Set by the worker: where the answer goes.
    future: asyncio.Future[T] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    answered: bool = False

    def run_alone(self, session: Session) -> Outputs:
        if self.feed is not None:
            return session.infer(self.feed)
        if self.tensor is None:
            raise BackendError("a job carries neither a tensor nor a feed")
        if self.state is None:
            return session.infer({self.frame_input: self.tensor, **self.side_inputs})
        if self.reset_state:
            self.state.reset()
        outputs = session.infer(self.state.feed(self.tensor, self.side_inputs))
        self.state.update(self.tensor, outputs)
        return outputs


@dataclass(frozen=True, slots=True)
class JobResult:
    outputs: Outputs
    infer_ns: int
    batch_size: int
    # What ran it: the worker's provenance (the route marks a degraded answer on a copy).
    provenance: stream_pb2.Provenance


def as_is(result: JobResult) -> JobResult:
    """A job's ``finish`` for callers that take the outputs themselves (KServe)."""
    return result


@dataclass(slots=True)
class _Instance:
    index: int
    thread: threading.Thread | None = None
    session: Session | None = None
    owns_session: bool = True
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class ModelWorker:
    """Runs one model's jobs on its instances; see the module docstring."""

    def __init__(
        self,
        name: str,
        open_session: SessionFactory,
        *,
        instances: int = 1,
        max_batch: int = 1,
        batch_delay_s: float = 0.0,
        check: SessionCheck | None = None,
        statistics: ModelStatistics | None = None,
    ) -> None:
        if instances < 1:
            raise BackendError(f"model {name}: instances must be at least 1, not {instances}")
        self.name = name
        self._open_session = open_session
        self._check = check
        self._max_batch = max(1, max_batch)
        self._batch_delay_s = max(0.0, batch_delay_s)
        self._instances = [_Instance(i) for i in range(instances)]
        self._queue = JobQueue()
        self._cond = threading.Condition()
        self._retired = False
        self.capabilities: SessionCapabilities | None = None
        # Set by whoever publishes the worker, once it has started (the device is known then).
        self.provenance = stream_pb2.Provenance(model=name)
        # The verdict of the golden frames on this worker's sessions (None: not run).
        self.self_test: manifest_pb2.SelfTestReport | None = None
        # Triton's statistics of every execution (shared with a fallback worker of the same model).
        self.statistics = statistics or ModelStatistics(name, "")
        # Faults of the worker's own, outside any model call (each answered, logged and counted here).
        self.faults = 0

    # -- lifecycle (blocking: call from a loader thread, never the event loop) ---------------------

    def start(self) -> None:
        """Open, warm up and check every instance's session on its own thread; raise if any fails."""
        first = self._instances[0]
        self._spawn(first, load=True)
        first.ready.wait()
        if first.error is not None:
            self.retire()
            self.join()
            raise first.error
        assert first.session is not None  # set with ready when there is no error
        self.capabilities = first.session.capabilities
        if self.capabilities.max_batch is not None:
            # Never stack more frames than the session can take in one inference.
            self._max_batch = max(1, min(self._max_batch, self.capabilities.max_batch))
        limit = self.capabilities.max_concurrency
        shared = limit is None or limit >= len(self._instances)
        for instance in self._instances[1:]:
            if shared:
                instance.session, instance.owns_session = first.session, False
            self._spawn(instance, load=not shared)
        for instance in self._instances[1:]:
            instance.ready.wait()
        failed = next((i.error for i in self._instances if i.error is not None), None)
        if failed is not None:
            self.retire()
            self.join()
            raise failed

    def _spawn(self, instance: _Instance, *, load: bool) -> None:
        instance.thread = threading.Thread(
            target=self._serve,
            args=(instance, load),
            name=f"edgescope-{self.name}-{instance.index}",
            daemon=True,
        )
        instance.thread.start()

    def retire(self) -> None:
        """Take no more jobs; threads finish what is queued, close their sessions and exit."""
        with self._cond:
            self._retired = True
            self._cond.notify_all()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for every thread to exit; True when all did."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for instance in self._instances:
            if instance.thread is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                instance.thread.join(remaining)
        return not any(i.thread is not None and i.thread.is_alive() for i in self._instances)

    @property
    def instances(self) -> int:
        return len(self._instances)

    # -- submitting (on the event loop) -----------------------------------------------------------

    def submit(self, job: Job[T]) -> asyncio.Future[T]:
        """Queue ``job`` now (in the caller's order) and return where its answer will be set."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job.loop, job.future = loop, future
        with self._cond:
            if self._retired:
                raise BackendError(f"model {self.name} is being unloaded; send the frame again")
            if len(self._queue) >= MAX_QUEUED_JOBS:
                raise OverloadError(f"model {self.name} has {len(self._queue)} requests waiting; try again shortly")
            job.enqueued_ns = time.perf_counter_ns()
            self._queue.put(job)
            self._cond.notify()
        return future

    async def answer(self, job: Job[T], future: asyncio.Future[T]) -> T:
        """Wait for a submitted job; cancelling the wait withdraws the job if it has not started."""
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    async def infer(self, job: Job[T]) -> T:
        """Submit ``job`` and wait for its answer."""
        return await self.answer(job, self.submit(job))

    def _withdraw(self, job: Job[Any]) -> None:
        with self._cond:
            job.cancelled = True
            self._queue.withdraw(job)

    # -- the instance threads ----------------------------------------------------------------------

    def _serve(self, instance: _Instance, load: bool) -> None:
        try:
            if load:
                instance.session = self._open_session()
            if self._check is not None and instance.owns_session:
                assert instance.session is not None
                self._check(instance.session)
        except BaseException as exc:
            instance.error = exc
            self._close(instance)
            return
        finally:
            instance.ready.set()
        assert instance.session is not None
        try:
            while self._take_and_run(instance.session):
                pass
        finally:
            if instance.owns_session:
                # Shared sessions are closed by their owner once every user has left.
                for other in self._instances:
                    if other is not instance and not other.owns_session and other.thread is not None:
                        other.thread.join()
            self._close(instance)

    def _take_and_run(self, session: Session) -> bool:
        """Run the next batch; False once retired and empty. Its frames (megabytes each) go with this call's
        frame, not kept while the thread waits for the next batch."""
        taken = self._next_batch()
        if taken is None:
            return False
        batch, charge = taken
        start = time.perf_counter_ns()
        try:
            self._run(session, batch)
        except Exception as exc:
            # A fault of the worker's own (statistics, hand-off) must not strand the jobs it took,
            # nor end the instance: they are answered, the fault is counted, the thread serves on.
            self.faults += 1
            logger.exception("an instance of %s failed outside its model; it serves on", self.name)
            for job in batch:
                self._settle(job, None, BackendError(f"model {self.name} failed: {type(exc).__name__}"))
        with self._cond:
            self._queue.charge(charge, time.perf_counter_ns() - start)
        return True

    def _close(self, instance: _Instance) -> None:
        if instance.owns_session and instance.session is not None:
            try:
                instance.session.close()
            except Exception:
                logger.exception("closing a session of %s failed", self.name)

    def _next_batch(self) -> tuple[list[Job[Any]], int] | None:
        """The next job, plus batchable company from other lanes, and the queue's charge for it;
        None once retired and empty."""
        with self._cond:
            while not self._queue:
                if self._retired:
                    return None
                self._cond.wait()
            first, charge = self._queue.pop_head()
            if first.batchable and self._max_batch > 1 and self._batch_delay_s > 0:
                deadline = time.monotonic() + self._batch_delay_s
                while self._queue.company_waiting(first) < self._max_batch - 1 and not self._retired:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch = [first]
            if first.batchable:
                lanes, taken = {job_queue.lane_of(first)}, job_queue.rows(first)
                while (company := self._queue.pop_company(first, lanes, self._max_batch - taken)) is not None:
                    batch.append(company)
                    lanes.add(job_queue.lane_of(company))
                    taken += job_queue.rows(company)
            return batch, charge

    def _run(self, session: Session, batch: list[Job[Any]]) -> None:
        live = [job for job in batch if not job.cancelled and self._in_time(job) and self._prepared(job)]
        if not live:
            return
        if len(live) > 1:
            try:
                self._run_batch(session, live)
                return
            except Exception as exc:
                # Find the frame that broke the batch: only it fails.
                logger.debug(
                    "a batch of %d for %s failed (%s); running its frames one by one", len(live), self.name, exc
                )
        for job in live:
            start = time.perf_counter_ns()
            try:
                outputs = job.run_alone(session)
            except Exception as exc:
                self._record([job], start, time.perf_counter_ns() - start, success=False)
                self._settle(job, None, _as_session_failure(exc, self.name))
                continue
            elapsed = time.perf_counter_ns() - start
            self._record([job], start, elapsed, success=True)
            self._finish(job, JobResult(outputs, elapsed, 1, self.provenance))

    def _in_time(self, job: Job[Any]) -> bool:
        """Whether the job's deadline still allows it; one that passed it waiting is answered so, unrun."""
        if job.deadline_ns is None or time.perf_counter_ns() <= job.deadline_ns:
            return True
        self._settle(job, None, DeadlineExpiredError("the frame's deadline passed while it waited for the model"))
        return False

    def _prepared(self, job: Job[Any]) -> bool:
        """Make the job's input here, if it brought none; a job whose input fails is answered with why."""
        if job.prepare is None or job.tensor is not None:
            return True
        try:
            job.tensor = job.prepare()
        except Exception as exc:
            self._settle(job, None, exc)
            return False
        return True

    def _run_batch(self, session: Session, jobs: list[Job[Any]]) -> None:
        start = time.perf_counter_ns()
        stacked = np.concatenate([job.tensor for job in jobs if job.tensor is not None])
        outputs = session.infer({jobs[0].frame_input: stacked})
        elapsed = time.perf_counter_ns() - start
        rows = len(stacked)
        # Each job gets its own rows back: only outputs that lead with the batch axis can be split so.
        uneven = [name for name, value in outputs.items() if value.ndim == 0 or value.shape[0] != rows]
        if uneven:
            raise SessionFailed(f"model {self.name}: outputs {uneven} do not have one row per batched input")
        self._record(jobs, start, elapsed, success=True)
        offset = 0
        for job in jobs:
            count = job_queue.rows(job)
            own = {name: value[offset : offset + count] for name, value in outputs.items()}
            offset += count
            self._finish(job, JobResult(own, elapsed, rows, self.provenance))

    def _finish(self, job: Job[Any], result: JobResult) -> None:
        """The caller's answer from the outputs, made here; a failure of its own is the job's answer."""
        try:
            answer = job.finish(result)
        except Exception as exc:
            self._settle(job, None, exc)
            return
        self._settle(job, answer, None)

    def _record(self, jobs: list[Job[Any]], start_ns: int, infer_ns: int, *, success: bool) -> None:
        """One execution, in Triton's terms: its requests' queue time and its compute time."""
        self.statistics.record(
            success=success,
            queue_ns=sum(max(0, start_ns - job.enqueued_ns) for job in jobs),
            compute_input_ns=0,
            infer_ns=infer_ns,
            output_ns=0,
            batch_size=sum(job.inferences for job in jobs),
            requests=len(jobs),
        )

    def _settle(self, job: Job[Any], answer: object, error: BaseException | None) -> None:
        """Hand the job's answer to its caller's loop; a job is answered once, whatever happens after."""
        if job.answered or job.loop is None or job.future is None:
            return
        job.answered = True
        # RuntimeError: the loop is closed, so nobody waits for this answer any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_resolve, job.future, answer, error)


def _resolve(future: asyncio.Future[Any], answer: object, error: BaseException | None) -> None:
    # The waiter may have been cancelled meanwhile; its answer was given elsewhere.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(answer)


def _as_session_failure(exc: Exception, name: str) -> EdgescopeError:
    """What a failed inference is answered with: the session's fault unless the error says otherwise."""
    if isinstance(exc, SessionFailed) or (isinstance(exc, EdgescopeError) and not isinstance(exc, BackendError)):
        return exc
    if isinstance(exc, BackendError):
        return SessionFailed(str(exc))
    return SessionFailed(f"model {name} failed: {type(exc).__name__}: {exc}")
