"""ONNX Runtime's intra-op threads: busy-waiting within a run is kept only where it measures faster."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from edgescope.bundle import Bundle
from edgescope.runtime import doctor
from edgescope.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgescope.runtime.backends.ort_threads import MIN_GAIN, choose_spinning, sample_feed
from edgescope.v1 import manifest_pb2


class _Timed:
    """A stand-in session whose runs take a set time, another while a core is kept busy."""

    def __init__(self, seconds: float, shared_seconds: float | None = None) -> None:
        self.seconds = seconds
        self.shared_seconds = seconds if shared_seconds is None else shared_seconds
        self.runs = 0

    def run(self, _names: Any, _feed: Any) -> None:
        self.runs += 1
        shared = any(thread.name == "edgescope-threading-load" for thread in threading.enumerate())
        end = time.perf_counter() + (self.shared_seconds if shared else self.seconds)
        while time.perf_counter() < end:
            pass


def _choose(
    sleeping_s: float, spinning_s: float, spinning_shared_s: float | None = None
) -> tuple[bool, dict[bool, _Timed]]:
    made = {False: _Timed(sleeping_s), True: _Timed(spinning_s, spinning_shared_s)}
    session, chosen = choose_spinning(lambda spinning: made[spinning], {"x": np.zeros(1)}, 2, budget_s=0.05)  # type: ignore[arg-type,return-value]
    assert session is made[chosen.spinning]
    assert "busy-waiting" in chosen.reason and "sleeping" in chosen.reason
    return chosen.spinning, made


def test_busy_waiting_is_kept_when_it_is_clearly_faster() -> None:
    spinning, made = _choose(0.004, 0.002)
    assert spinning
    # Both ways were measured, more than once each.
    assert made[False].runs > 2 and made[True].runs > 2


def test_sleeping_is_kept_unless_busy_waiting_wins_by_the_margin() -> None:
    assert not _choose(0.002, 0.004)[0]
    # A gain under the margin does not pay for a core held by a busy-waiting thread.
    assert not _choose(0.003, 0.003 * (1 - MIN_GAIN / 3))[0]


def test_busy_waiting_that_stalls_beside_a_busy_core_is_not_kept() -> None:
    # Faster alone, three times slower when another thread holds a core: a device is rarely alone.
    assert not _choose(0.004, 0.002, spinning_shared_s=0.012)[0]


def _manifest(*dims: int | str) -> manifest_pb2.ModelManifest:
    manifest = manifest_pb2.ModelManifest()
    tensor = manifest.inputs.add(name="image", dtype=manifest_pb2.DATA_TYPE_FLOAT32)
    for dim in dims:
        if isinstance(dim, int):
            tensor.shape.add(size=dim)
        else:
            tensor.shape.add(symbol=dim)
    return manifest


def test_sample_feed_takes_a_batch_of_one_and_gives_up_on_other_dynamic_dimensions() -> None:
    feed = sample_feed(_manifest("batch", 1, 64, 48))
    assert feed is not None and feed["image"].shape == (1, 1, 64, 48) and feed["image"].dtype == np.float32
    assert sample_feed(_manifest("batch", 1, "height", "width")) is None


def test_the_measured_choice_is_made_once_per_graph_and_reported_by_doctor(example_bundle: Bundle) -> None:
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    with backend.load(example_bundle) as first, backend.load(example_bundle) as second:
        assert first.threading is not None and first.threading.reason.startswith("measured")
        # The second instance reuses the measurement instead of taking the cores to measure again.
        assert second.threading is first.threading
        options = second._session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == (
            "1" if first.threading.spinning else "0"
        )
    check = doctor.threading_check(example_bundle.path)
    assert check.status == doctor.OK
    assert check.details["why"].startswith("measured") and "intra-op thread" in check.summary


@pytest.mark.parametrize("spinning", ["on", "off"])
def test_a_configured_choice_is_not_measured(example_bundle: Bundle, spinning: str) -> None:
    with OnnxRuntimeBackend(intra_op_threads=1, spinning=spinning).load(example_bundle) as session:
        assert session.threading is not None
        assert session.threading.spinning == (spinning == "on") and session.threading.reason == "as configured"
