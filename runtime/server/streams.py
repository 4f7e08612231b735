"""Real-time scheduling of one stream's frames.

Policies (``Frame.policy`` on the first frame, else the server default):

- ``live``: the newest frame wins. At most one frame waits; a newer frame
  replaces it and the replaced one is answered ``dropped: stale``.
- ``every``: every frame, in order; a short bounded queue makes gRPC flow
  control slow the client down instead of dropping.

Frames move through three stages, each held by one frame at a time and
handed over in arrival order (hand-over-hand), so the next frame decodes and
preprocesses while this one is in inference, and this one postprocesses
while the next is inferred. Each frame gets exactly one answer, in arrival
order: a result, or a drop or error notice with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from edgescope.errors import EdgescopeError
from edgescope.runtime.backends.base import Outputs
from edgescope.runtime.pipeline.decode import DEFAULT_LIMITS, FrameLimits
from edgescope.runtime.pipeline.state import StreamState, frame_input
from edgescope.runtime.server.registry import LoadedModel, ModelRegistry
from edgescope.runtime.server.stages import ModelInput, as_model_result, finish, infer, prepare, stamp
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

EVERY_QUEUE_FRAMES = 2
ANSWER_BACKLOG = 64

_DROP_TEXT = {
    stream_pb2.DROP_REASON_STALE: "stale: a newer frame arrived before this one started",
    stream_pb2.DROP_REASON_DEADLINE: "deadline: it could no longer be answered in time",
    stream_pb2.DROP_REASON_SHUTDOWN: "shutdown: the server is stopping",
}


def answer_for(frame: stream_pb2.Frame) -> stream_pb2.Result:
    return stream_pb2.Result(stream_id=frame.stream_id, seq=frame.seq, capture_time_ns=frame.capture_time_ns)


def dropped(frame: stream_pb2.Frame, reason: stream_pb2.DropReason.ValueType) -> stream_pb2.Result:
    result = answer_for(frame)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_DROPPED
    result.status.drop_reason = reason
    result.status.reason = _DROP_TEXT[reason]
    return result


def failed(frame: stream_pb2.Frame, error: Exception) -> stream_pb2.Result:
    result = answer_for(frame)
    result.status.code = stream_pb2.FRAME_STATUS_CODE_ERROR
    if isinstance(error, EdgescopeError):
        result.status.reason = str(error)
    else:
        result.status.reason = f"internal error: {type(error).__name__}: {error}"
    return result


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: stream_pb2.StreamPolicy.ValueType = stream_pb2.STREAM_POLICY_EVERY
    deadline_ms: int = 0
    max_batch: int = 8
    max_batch_delay_s: float = 0.002
    frame_limits: FrameLimits = DEFAULT_LIMITS


_BatchItem = tuple[ModelInput, "asyncio.Future[tuple[Outputs, int]]"]


@dataclass(slots=True)
class _Work:
    frame: stream_pb2.Frame
    received_ns: int
    answer: asyncio.Future[stream_pb2.Result]


class ModelBatcher:
    """Gathers concurrent requests for one model into one batched inference.

    A request waits at most ``max_delay_s`` for company (0: only requests
    already waiting are batched, so a lone stream pays no added latency);
    batches never exceed ``max_batch``. Used only for models whose batch
    dimension is dynamic.
    """

    def __init__(self, model: LoadedModel, executor: Executor, max_batch: int, max_delay_s: float) -> None:
        self.model = model
        self._executor = executor
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._pending: asyncio.Queue[_BatchItem | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.batches = 0
        self.items = 0

    async def infer(self, model_input: ModelInput) -> tuple[Outputs, int]:
        future: asyncio.Future[tuple[Outputs, int]] = asyncio.get_running_loop().create_future()
        await self._pending.put((model_input, future))
        return await future

    def retire(self) -> None:
        """Finish what is queued, then stop; no new requests may come after this."""
        self._pending.put_nowait(None)

    async def _gather(self, first: _BatchItem) -> tuple[list[_BatchItem], bool]:
        """Collect a batch; the flag says the batcher was retired meanwhile."""
        loop = asyncio.get_running_loop()
        batch = [first]
        deadline = loop.time() + self._max_delay_s
        while len(batch) < self._max_batch:
            if self._pending.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._pending.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                item = self._pending.get_nowait()
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        retired = False
        while not retired:
            first = await self._pending.get()
            if first is None:
                return
            batch, retired = await self._gather(first)
            try:
                outputs, elapsed = await loop.run_in_executor(self._executor, self._run_batch, [i for i, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for index, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result(({name: value[index : index + 1] for name, value in outputs.items()}, elapsed))

    def _run_batch(self, inputs: list[ModelInput]) -> tuple[Outputs, int]:
        start = time.perf_counter_ns()
        stacked = np.concatenate([i.tensor for i in inputs]) if len(inputs) > 1 else inputs[0].tensor
        outputs = self.model.session.infer({frame_input(self.model.manifest): stacked})
        return outputs, time.perf_counter_ns() - start

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


BatcherLookup = Callable[[LoadedModel], ModelBatcher | None]


class _LiveSlot:
    """Holds at most one waiting frame; a newer one replaces it."""

    def __init__(self) -> None:
        self._item: _Work | None = None
        self._closed = False
        self._changed = asyncio.Event()

    def put(self, item: _Work) -> _Work | None:
        replaced, self._item = self._item, item
        self._changed.set()
        return replaced

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def take(self) -> _Work | None:
        while self._item is None:
            if self._closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        item, self._item = self._item, None
        return item


class StreamScheduler:
    """Schedules one stream: intake by policy, three overlapped stages, ordered answers."""

    def __init__(
        self,
        registry: ModelRegistry,
        executor: Executor,
        config: SchedulerConfig,
        batcher_for: BatcherLookup,
        draining: asyncio.Event,
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._config = config
        self._batcher_for = batcher_for
        self._draining = draining
        self._answers: asyncio.Queue[asyncio.Future[stream_pb2.Result] | None] = asyncio.Queue(ANSWER_BACKLOG)
        self._stages = (asyncio.Lock(), asyncio.Lock(), asyncio.Lock())
        self._policy: stream_pb2.StreamPolicy.ValueType = config.policy
        # Set once the first frame has chosen the policy (or the stream ended).
        self._policy_known = asyncio.Event()
        self._model = ""
        # Recurrent state and previous frames live as long as this stream.
        self._state = StreamState()

    async def run(self, frames: AsyncIterable[stream_pb2.Frame]) -> AsyncIterator[stream_pb2.Result]:
        """Answer every frame read from ``frames``, in order; stops early when draining."""
        live = _LiveSlot()
        every: asyncio.Queue[_Work | None] = asyncio.Queue(EVERY_QUEUE_FRAMES)
        reader = asyncio.create_task(self._read(frames, live, every))
        dispatcher = asyncio.create_task(self._dispatch(live, every))
        try:
            while (answer := await self._answers.get()) is not None:
                yield await answer
        finally:
            reader.cancel()
            dispatcher.cancel()
            await asyncio.gather(reader, dispatcher, return_exceptions=True)

    async def _read(
        self, frames: AsyncIterable[stream_pb2.Frame], live: _LiveSlot, every: asyncio.Queue[_Work | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        iterator = aiter(frames)
        drain = asyncio.ensure_future(self._draining.wait())
        next_frame: asyncio.Future[stream_pb2.Frame] | None = None
        try:
            while True:
                next_frame = asyncio.ensure_future(anext(iterator))
                await asyncio.wait((next_frame, drain), return_when=asyncio.FIRST_COMPLETED)
                if not next_frame.done():
                    # Draining: frames not yet read are no longer accepted.
                    next_frame.cancel()
                    break
                try:
                    frame = next_frame.result()
                except StopAsyncIteration:
                    break
                received = time.perf_counter_ns()
                if not self._policy_known.is_set():
                    self._policy = frame.policy or self._config.policy
                    self._policy_known.set()
                work = _Work(frame, received, loop.create_future())
                await self._answers.put(work.answer)
                if self._policy == stream_pb2.STREAM_POLICY_LIVE:
                    replaced = live.put(work)
                    if replaced is not None:
                        replaced.answer.set_result(dropped(replaced.frame, stream_pb2.DROP_REASON_STALE))
                else:
                    await every.put(work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The client's side of the stream broke; answer what was received, then end.
            logger.warning("reading stream frames failed: %s", exc)
        finally:
            drain.cancel()
            if next_frame is not None:
                next_frame.cancel()
            self._policy_known.set()
            live.close()
        await every.put(None)

    async def _dispatch(self, live: _LiveSlot, every: asyncio.Queue[_Work | None]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        first = self._stages[0]
        try:
            await self._policy_known.wait()
            is_live = self._policy == stream_pb2.STREAM_POLICY_LIVE
            while True:
                await first.acquire()
                work = await (live.take() if is_live else every.get())
                if work is None:
                    first.release()
                    break
                task = asyncio.create_task(self._process(work))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            await self._answers.put(None)

    def _deadline_missed(self, work: _Work) -> bool:
        budget_ms = work.frame.deadline_ms or self._config.deadline_ms
        return budget_ms > 0 and time.perf_counter_ns() - work.received_ns > budget_ms * 1_000_000

    async def _process(self, work: _Work) -> None:
        """Run one frame through the stages; the first stage lock is already held."""
        frame = work.frame
        held = [self._stages[0]]
        models: list[LoadedModel] = []
        loop = asyncio.get_running_loop()
        late = False
        try:
            queued_ns = time.perf_counter_ns() - work.received_ns
            if self._deadline_missed(work):
                if not frame.process_late:
                    work.answer.set_result(dropped(frame, stream_pb2.DROP_REASON_DEADLINE))
                    return
                late = True
            if frame.model:
                self._model = frame.model
            for name in (self._model, *frame.extra_models):
                models.append(self._registry.acquire(name))
            prepared = await loop.run_in_executor(self._executor, prepare, frame, models, self._config.frame_limits)
            await self._stages[1].acquire()
            held.append(self._stages[1])
            held.remove(self._stages[0])
            self._stages[0].release()
            if self._deadline_missed(work) and not late:
                if not frame.process_late:
                    work.answer.set_result(dropped(frame, stream_pb2.DROP_REASON_DEADLINE))
                    return
                late = True
            inferred = [await self._infer(model_input, frame.reset_state) for model_input in prepared.inputs]
            await self._stages[2].acquire()
            held.append(self._stages[2])
            held.remove(self._stages[1])
            self._stages[1].release()
            answers = [
                await loop.run_in_executor(self._executor, finish, model_input, outputs, infer_ns, frame)
                for model_input, (outputs, infer_ns) in zip(prepared.inputs, inferred, strict=True)
            ]
            result = answers[0]
            stamp(result, frame, queued_ns, prepared.decode_ns)
            result.status.late = late
            for model_input, extra in zip(prepared.inputs[1:], answers[1:], strict=True):
                result.model_results.append(as_model_result(model_input.model.name, extra))
            work.answer.set_result(result)
        except EdgescopeError as exc:
            work.answer.set_result(failed(frame, exc))
        except Exception as exc:
            logger.exception("frame %s/%d failed unexpectedly", frame.stream_id, frame.seq)
            work.answer.set_result(failed(frame, exc))
        finally:
            for lock in held:
                lock.release()
            for model in models:
                self._registry.release(model)

    async def _infer(self, model_input: ModelInput, reset: bool) -> tuple[Outputs, int]:
        batcher = self._batcher_for(model_input.model)
        if batcher is not None:
            return await batcher.infer(model_input)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, infer, model_input, self._state, reset)
