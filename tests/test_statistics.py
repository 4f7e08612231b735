"""The per-model statistics accumulator behind the protocol's ModelStatistics."""

from __future__ import annotations

import threading

import pytest

from edgescope.runtime.server.statistics import ModelStatistics


def test_a_success_counts_requests_inferences_and_execution() -> None:
    statistics = ModelStatistics("m", "1")
    # One execution answering two requests, four inferences in all.
    statistics.record(
        success=True, queue_ns=300, compute_input_ns=10, infer_ns=100, output_ns=20, batch_size=4, requests=2
    )
    statistics.record(success=True, queue_ns=50, compute_input_ns=5, infer_ns=80, output_ns=15)
    figures = statistics.snapshot()
    assert (figures.name, figures.version) == ("m", "1")
    assert figures.inference_count == 4 + 1
    assert figures.execution_count == 2
    assert figures.success.count == 3
    # Each request is charged its execution's compute time, plus its own wait.
    assert figures.success.ns == (300 + 2 * 130) + (50 + 100)
    assert (figures.queue.count, figures.queue.ns) == (3, 350)
    assert (figures.compute_infer.count, figures.compute_infer.ns) == (3, 2 * 100 + 80)
    assert figures.compute_input.ns == 2 * 10 + 5 and figures.compute_output.ns == 2 * 20 + 15
    assert sorted(figures.batches) == [1, 4]
    assert figures.batches[4].compute_infer.count == 1 and figures.batches[4].compute_infer.ns == 100
    assert figures.batches[1].compute_output.ns == 15
    assert figures.last_inference_ms > 0
    assert figures.fail.count == 0


def test_a_failure_counts_only_as_failed() -> None:
    statistics = ModelStatistics("m", "1")
    statistics.record(success=False, queue_ns=40, compute_input_ns=7, infer_ns=0, output_ns=0)
    figures = statistics.snapshot()
    assert (figures.fail.count, figures.fail.ns) == (1, 47)
    assert figures.success.count == figures.execution_count == figures.inference_count == 0
    assert figures.queue.count == 0 and not figures.batches
    assert figures.last_inference_ms == 0


def test_a_snapshot_does_not_change_afterwards() -> None:
    statistics = ModelStatistics("m", "1")
    statistics.record(success=True, queue_ns=1, compute_input_ns=1, infer_ns=1, output_ns=1)
    before = statistics.snapshot()
    statistics.record(success=True, queue_ns=1, compute_input_ns=1, infer_ns=1, output_ns=1)
    assert before.execution_count == 1 and before.batches[1].compute_infer.count == 1
    assert statistics.snapshot().batches[1].compute_infer.count == 2


def test_concurrent_records_are_all_counted() -> None:
    statistics = ModelStatistics("m", "1")
    threads, per_thread = 8, 500

    def work() -> None:
        for _ in range(per_thread):
            statistics.record(success=True, queue_ns=2, compute_input_ns=1, infer_ns=3, output_ns=1, batch_size=2)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    figures = statistics.snapshot()
    assert figures.execution_count == threads * per_thread
    assert figures.inference_count == 2 * threads * per_thread
    assert figures.compute_infer.ns == 3 * threads * per_thread


@pytest.mark.parametrize(("batch_size", "requests"), [(0, 1), (1, 0)])
def test_an_empty_execution_is_refused(batch_size: int, requests: int) -> None:
    with pytest.raises(ValueError, match="batch_size >= 1"):
        ModelStatistics("m", "1").record(
            success=True,
            queue_ns=0,
            compute_input_ns=0,
            infer_ns=0,
            output_ns=0,
            batch_size=batch_size,
            requests=requests,
        )
