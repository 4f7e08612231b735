"""One frame on its model and extra models, from a stream or a unary call (``Infer``).

The models are leased for the time the frame takes; a frame's jobs carry
its deadline into the models' queues, and an answer still running at the
deadline is given up (``DeadlineExpiredError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from edgescope.errors import DeadlineExpiredError, ModelNotFoundError
from edgescope.runtime.pipeline.decode import DEFAULT_LIMITS, FrameLimits, SharedMemoryView, check_frame_fields
from edgescope.runtime.pipeline.state import StreamState, is_stateful
from edgescope.runtime.server.auth import current_client
from edgescope.runtime.server.registry import ModelRegistry, ServedModel, fallback_model
from edgescope.runtime.server.stages import Finished, FramePixels, answer, as_model_result, frame_jobs, job_for
from edgescope.v1 import stream_pb2

T = TypeVar("T")


async def run_frame(
    models: ModelRegistry,
    frame: stream_pb2.Frame,
    model: str,
    pixels: FramePixels,
    received_ns: int,
    lane: str,
    state: StreamState,
    *,
    want_thumbnail: bool = False,
    deadline_ns: int | None = None,
    sequential: asyncio.Lock | None = None,
    partners: Mapping[str, FramePixels] | None = None,
    live: bool = False,
    opening: bool = False,
) -> Finished:
    """One frame on ``model`` and its extra models, each leased for the time it takes.

    A model with recurrent state takes the frames of one ``sequential`` lock's holder one by one.
    ``live``: a frame of a stream or capture, served before unary calls; ``opening``: the stream's first
    frame, which gives way to the frames of streams already running (see ``job_queue``).
    """
    leases: list[ServedModel] = []
    try:
        for name in (model, *frame.extra_models):
            leases.append(models.lease(name))
        jobs = frame_jobs(frame, leases, pixels, received_ns, want_thumbnail, partners)
        stateful = sequential is not None and any(is_stateful(job.model.manifest) for job in jobs)
        async with sequential if stateful and sequential is not None else contextlib.nullcontext():
            # One model after another: a frame's extra models are rare, and each keeps its own order.
            finished = [
                await _in_time(
                    job.model.infer(job_for(job, lane, state, frame.reset_state, deadline_ns, live, opening)),
                    deadline_ns,
                )
                for job in jobs
            ]
        first = answer(jobs, finished)
        other = fallback_model(leases[0].policy.out_of_domain)
        domain = first.result.domain
        if not other or not domain.checked or domain.in_domain:
            return first
        return await _fall_back(
            models, other, first, frame, pixels, received_ns, lane, state, deadline_ns, partners, live
        )
    finally:
        for leased in leases:
            models.release(leased)


async def _fall_back(
    models: ModelRegistry,
    other: str,
    first: Finished,
    frame: stream_pb2.Frame,
    pixels: FramePixels,
    received_ns: int,
    lane: str,
    state: StreamState,
    deadline_ns: int | None,
    partners: Mapping[str, FramePixels] | None,
    live: bool,
) -> Finished:
    """The answer of model ``other`` to a frame out of the first model's domain, the first's own beside it."""
    primary = first.result.provenance.model
    try:
        fallback = models.lease(other)
    except ModelNotFoundError:
        first.result.alerts.add(
            kind=stream_pb2.Alert.KIND_OUT_OF_DOMAIN,
            model=primary,
            message=f"model {other}, this model's fallback for frames out of its domain, is not loaded: "
            "this is the first model's own answer",
        )
        return first
    try:
        (job,) = frame_jobs(frame, [fallback], pixels, received_ns, False, partners)
        finished = await _in_time(
            fallback.infer(job_for(job, lane, state, frame.reset_state, deadline_ns, live)), deadline_ns
        )
    finally:
        models.release(fallback)
    finished.result.fallback_from = primary
    finished.result.alerts.extend(first.result.alerts)
    finished.result.model_results.append(as_model_result(primary, first.result))
    finished.result.model_results.extend(first.result.model_results)
    finished.preview = first.preview
    return finished


async def _in_time(answer: Awaitable[T], deadline_ns: int | None) -> T:
    """``answer``, or ``DeadlineExpiredError`` once ``deadline_ns`` has passed (the job is withdrawn, or its
    result is discarded when it arrives)."""
    if deadline_ns is None:
        return await answer
    try:
        return await asyncio.wait_for(answer, max(0.0, (deadline_ns - time.perf_counter_ns()) / 1e9))
    except asyncio.TimeoutError:
        raise DeadlineExpiredError("the frame's deadline passed while it was at the model") from None


async def infer_one(
    models: ModelRegistry,
    frame: stream_pb2.Frame,
    lane: str,
    shared_memory: SharedMemoryView | None = None,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> stream_pb2.Result:
    """One frame on its model(s), for ``Infer``; raises ``EdgescopeError`` for bad input or a failing model.

    No stream: a stateful model starts from its initial state.
    """
    received_ns = time.perf_counter_ns()
    check_frame_fields(frame, limits)
    pixels = FramePixels(frame, shared_memory, limits)
    finished = await run_frame(models, frame, frame.model, pixels, received_ns, lane, StreamState())
    return finished.result


def unary_lane() -> str:
    """The one lane at the models' workers that all the current client's unary calls share."""
    return f"{current_client()}/unary"
