"""Cumulative inference statistics per model, as Triton reports them.

Whatever runs a model records each execution here; the Open Inference
Protocol's ``ModelStatistics`` call reads it. The figures follow Triton's
definitions: per request, success and failure with their durations, and where
a successful request's time went (queue, compute_input, compute_infer,
compute_output); per execution, the number of executions, the inferences
they made (a request of batch 4 makes 4) and the compute time per batch size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Duration:
    """How many times, and how long in total (nanoseconds)."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, ns: int) -> Duration:
        return Duration(self.count + count, self.ns + ns)


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    """Executions of one batch size and their compute time."""

    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass(frozen=True, slots=True)
class StatisticsSnapshot:
    """One model version's figures at one moment."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: dict[int, BatchStatistics] = field(default_factory=dict)


class ModelStatistics:
    """Thread-safe accumulator for one model version."""

    def __init__(self, name: str, version: str) -> None:
        self._lock = threading.Lock()
        self._figures = StatisticsSnapshot(name, version)

    def record(
        self,
        *,
        success: bool,
        queue_ns: int,
        compute_input_ns: int,
        infer_ns: int,
        output_ns: int,
        batch_size: int = 1,
        requests: int = 1,
    ) -> None:
        """One execution that answered ``requests`` requests with ``batch_size`` inferences in all.

        ``queue_ns`` is the requests' waits added up; the compute durations
        are the execution's, and each request it answered is charged them
        (as Triton does). A failure counts only as failed requests.
        """
        if batch_size < 1 or requests < 1:
            raise ValueError(f"an execution has batch_size >= 1 and requests >= 1, not {batch_size} and {requests}")
        compute_ns = compute_input_ns + infer_ns + output_ns
        total_ns = queue_ns + requests * compute_ns
        with self._lock:
            now = self._figures
            if not success:
                self._figures = replace(now, fail=now.fail.add(requests, total_ns))
                return
            batch = now.batches.get(batch_size, BatchStatistics())
            batches = dict(now.batches)
            batches[batch_size] = BatchStatistics(
                compute_input=batch.compute_input.add(1, compute_input_ns),
                compute_infer=batch.compute_infer.add(1, infer_ns),
                compute_output=batch.compute_output.add(1, output_ns),
            )
            self._figures = replace(
                now,
                last_inference_ms=time.time_ns() // 1_000_000,
                inference_count=now.inference_count + batch_size,
                execution_count=now.execution_count + 1,
                success=now.success.add(requests, total_ns),
                queue=now.queue.add(requests, queue_ns),
                compute_input=now.compute_input.add(requests, requests * compute_input_ns),
                compute_infer=now.compute_infer.add(requests, requests * infer_ns),
                compute_output=now.compute_output.add(requests, requests * output_ns),
                batches=batches,
            )

    def clear(self) -> None:
        """Forget every execution so far (the server's own warm-up is not a request)."""
        with self._lock:
            self._figures = StatisticsSnapshot(self._figures.name, self._figures.version)

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            return self._figures
