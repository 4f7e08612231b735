"""Degraded mode: a second, self-tested way to run a model when the primary fails.

With ``serve --fallback BACKEND`` every model has two workers: the primary
(say TensorRT on the GPU) and a fallback (say ONNX Runtime on the CPU), both
loaded, warmed up and self-tested at load. While the primary works, the
fallback only waits. When a job fails on the primary, the same job is tried
on the fallback: if the fallback fails too, the frame was at fault (bad
input) and fails alone; if the fallback succeeds, the primary is the fault
(a CUDA error, a lost GPU, a remote server down) and the model turns
degraded. Degraded, every frame goes to the fallback, every result says so
(``Provenance.degraded`` and the reason), an alert is in force, and the
primary is rebuilt from scratch (new sessions, warm-up, self-test) on a
background thread with exponential backoff; once rebuilt it serves again.
Never silent, and never on a way to run the model that did not pass its
self-test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from edgescope.errors import EdgescopeError
from edgescope.runtime.server.workers import Job, JobResult, ModelWorker, SessionFailed
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

FIRST_RETRY_S = 2.0
MAX_RETRY_S = 60.0
# How long a rebuild waits for the failed primary's sessions to close first.
CLOSE_FAILED_S = 10.0

T = TypeVar("T")
# Builds and starts a fresh primary worker (blocking: loads, warms up and self-tests).
OpenWorker = Callable[[], ModelWorker]


class ModelRoute:
    """Which worker runs a model's jobs now; thread-safe."""

    def __init__(self, name: str, primary: ModelWorker, fallback: ModelWorker | None, reopen: OpenWorker) -> None:
        self.name = name
        self._primary = primary
        self._fallback = fallback
        self._reopen = reopen
        self._lock = threading.Lock()
        self._reason = ""
        self._since = 0.0
        self._backoff_s = FIRST_RETRY_S
        self._retry_at = 0.0
        self._retrying = False
        self._closed = False
        self.on_change: Callable[[str, str], None] = lambda _model, _reason: None

    @property
    def primary(self) -> ModelWorker:
        with self._lock:
            return self._primary

    @property
    def fallback(self) -> ModelWorker | None:
        return self._fallback

    @property
    def degraded_reason(self) -> str:
        """Why the fallback serves; empty while the primary does."""
        with self._lock:
            return self._reason

    @property
    def provenance(self) -> stream_pb2.Provenance:
        """What results carry now: the primary's, or the fallback's marked degraded."""
        with self._lock:
            primary, reason = self._primary, self._reason
        if not reason or self._fallback is None:
            return primary.provenance
        return _degraded(self._fallback.provenance, reason)

    def infer(self, job: Job[T]) -> Awaitable[T]:
        """Queue ``job`` now, on the worker that serves, and return its answer to await.

        Queued before the first ``await``, so a caller's jobs keep the order it made them in.
        """
        with self._lock:
            primary, reason = self._primary, self._reason
        if not reason or self._fallback is None:
            return self._on_primary(primary, job, primary.submit(job))
        self._maybe_retry()
        fallback = _marked(job, reason)
        return self._fallback.answer(fallback, self._fallback.submit(fallback))

    async def _on_primary(self, primary: ModelWorker, job: Job[T], future: asyncio.Future[T]) -> T:
        try:
            return await primary.answer(job, future)
        except SessionFailed as exc:
            if self._fallback is None:
                raise
            failure = exc
        # The fallback decides whose fault it was: if it fails too, the frame's.
        reason = _reason(primary, failure)
        answer = await self._fallback.infer(_marked(job, reason))
        self._degrade(primary, reason)
        return answer

    def _degrade(self, failed: ModelWorker, reason: str) -> None:
        with self._lock:
            if self._primary is not failed or self._reason or self._closed:
                return
            self._reason = reason
            self._since = time.monotonic()
            self._backoff_s = FIRST_RETRY_S
            self._retry_at = self._since + self._backoff_s
        logger.error("model %s is degraded, served by its fallback: %s", self.name, reason)
        self.on_change(self.name, reason)

    def _maybe_retry(self) -> None:
        with self._lock:
            if self._retrying or self._closed or time.monotonic() < self._retry_at:
                return
            self._retrying = True
        threading.Thread(target=self._retry, name=f"edgescope-{self.name}-retry", daemon=True).start()

    def _retry(self) -> None:
        """Rebuild the primary; swap it in if it loads and passes its self-test, else back off.

        The failed primary is closed first (its sessions and device memory freed, on their own
        threads), so the rebuild has the device to itself; while degraded nothing runs on it.
        """
        with self._lock:
            failed = self._primary
        failed.retire()
        if not failed.join(CLOSE_FAILED_S):
            logger.warning("model %s: the failed primary has not closed after %.0f s", self.name, CLOSE_FAILED_S)
        try:
            fresh = self._reopen()
        except Exception as exc:
            with self._lock:
                self._backoff_s = min(self._backoff_s * 2, MAX_RETRY_S)
                self._retry_at = time.monotonic() + self._backoff_s
                self._retrying = False
            logger.warning(
                "model %s: the primary is still failing (%s); next try in %.0f s", self.name, exc, self._backoff_s
            )
            return
        with self._lock:
            self._primary = fresh
            closed = self._closed
            self._reason, self._retrying = "", False
        if closed:
            fresh.retire()
            return
        logger.info("model %s: the primary serves again", self.name)
        self.on_change(self.name, "")

    def workers(self) -> list[ModelWorker]:
        with self._lock:
            return [self._primary, *([self._fallback] if self._fallback is not None else [])]

    def retire(self) -> None:
        """Stop every worker of this route (each finishes what it has first)."""
        with self._lock:
            self._closed = True
        for worker in self.workers():
            worker.retire()


def _reason(primary: ModelWorker, error: EdgescopeError) -> str:
    return f"the primary ({primary.provenance.backend} on {primary.provenance.device}) failed: {error}"


def _marked(job: Job[T], reason: str) -> Job[T]:
    """The same request for the fallback, unsent (a job's future belongs to the worker it was sent to),
    whose answer says on its provenance that the fallback made it, and why."""
    finish = job.finish

    def finish_marked(result: JobResult) -> T:
        return finish(dataclasses.replace(result, provenance=_degraded(result.provenance, reason)))

    return dataclasses.replace(job, finish=finish_marked, future=None, loop=None, cancelled=False, answered=False)


def _degraded(provenance: stream_pb2.Provenance, reason: str) -> stream_pb2.Provenance:
    marked = stream_pb2.Provenance()
    marked.CopyFrom(provenance)
    marked.degraded = True
    marked.degraded_reason = reason or "the primary failed"
    return marked
