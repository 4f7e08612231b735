"""``edgescope serve --results-to URL``: the captures' results become DICOM objects in the archive.

A capture's source is the server's own (a probe, a camera): it carries no
patient, so its results are written as ``edgescope stream`` writes a source
that is not DICOM (``archive.recorders.KeyFrameRecorder``): the key frames
the policy chooses (``--key-frames``) as Secondary Capture images in the
study ``--study-context`` names, with their Segmentation and reports. Every
capture of one source gets its own recorder; a batch of key frames is written
when it holds ``--max-key-frames`` of them, and when the capture's run ends
(its source ended or failed, or the server stops).

Choosing a key frame runs on the event loop with the results (a copy of the
chosen frame's pixels; a decoded mask). Writing a batch into the durable
outbox runs on one thread, delivering what waits there on another, so
neither the frame path nor the loop waits for the archive, and an archive
that is slow or down holds no batch in memory: batches are written as they
come, and one delivery at a time sends all that waits (a request while one
runs starts one more after it). Should writing fall behind
(``MAX_BATCHES_WAITING``), no key frame is taken until it catches up, and the
log says so: memory stays bounded and the frame path does not wait. Every
object written and every one the archive confirms is recorded in the audit
trail (by SOP Instance UID, never by patient), as is a delivery that left
objects waiting; those wait in the outbox for the next delivery or
``edgescope outbox send``. The labels are coded as the bundle the results
came from codes them, read from the registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edgescope.errors import EdgescopeError
from edgescope.runtime.archive.audit import AuditTrail, record_results
from edgescope.runtime.archive.key_frames import KeyFrameChooser, KeyFramePolicy
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.recorders import KeyFrameRecorder, LabelCodesFor, deliver_outbox
from edgescope.runtime.archive.seg import Code, label_codes_of
from edgescope.runtime.archive.study import StudyContext
from edgescope.runtime.server.registry import ModelRegistry
from edgescope.runtime.sources.base import SourceFrame, SourceKind
from edgescope.v1 import stream_pb2

logger = logging.getLogger(__name__)

# Frames sent and not answered yet, per capture: a live stream answers each soon (or drops it), so a few suffice.
MAX_IN_FLIGHT = 64
# Once the server stops, deliveries go on for at most this long: what is left waits in the outbox
# (edgescope outbox send), and the stop is not held for the archive.
STOP_DELIVERY_S = 5.0
# A delivery is made of tries this long, so that a stop cuts one short.
DELIVERY_SLICE_S = 1.0
# Batches waiting to be written, at most: while the writing thread is this far behind, no key frame is taken.
MAX_BATCHES_WAITING = 2


@dataclass(frozen=True, slots=True)
class CaptureResults:
    """Where the captures' results go and how: checked before the server starts."""

    url: str
    study: StudyContext
    policy: KeyFramePolicy
    outbox: Path
    delivery_timeout_s: float = 60.0
    # "fractional": the captures' frames ask for probabilities (every frame: a key frame is chosen after its
    # answer), and their Segmentations are FRACTIONAL.
    seg_type: str = "binary"


def registry_label_codes(registry: ModelRegistry) -> LabelCodesFor:
    """The label codes of the bundle results came from, as the registry serves it now."""

    def codes(provenance: stream_pb2.Provenance) -> tuple[dict[str, tuple[Code, Code]], str]:
        try:
            model = registry.get(provenance.model)
        except EdgescopeError as exc:
            return {}, f"default rule ({exc})"
        if provenance.sha256 and model.provenance.sha256 != provenance.sha256:
            return {}, f"default rule (the server now serves another bundle of {provenance.model})"
        found = label_codes_of(model.manifest)
        return found, "bundle" if found else "default rule (the bundle gives no label codes)"

    return codes


@dataclass(slots=True)
class _Capture:
    kind: SourceKind
    recorder: KeyFrameRecorder
    in_flight: OrderedDict[int, SourceFrame] = dataclasses.field(default_factory=OrderedDict)


class CaptureArchive:
    """Records each capture's results, hands full batches to the writing thread and asks for deliveries."""

    def __init__(self, settings: CaptureResults, registry: ModelRegistry) -> None:
        self.settings = settings
        self._outbox = Outbox(settings.outbox)
        self._audit: AuditTrail | None = registry.audit
        self._label_codes = registry_label_codes(registry)
        self._captures: dict[str, _Capture] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgescope-archive-write")
        # One delivery at a time sends all that waits; a request while one runs starts one more after it.
        self._wanted = threading.Event()
        self._closing = False
        # Set when the stop leaves a delivery behind: the audit trail is closed next, so that delivery records nothing.
        self._left = False
        # A daemon: a try that the archive holds (an unreachable archive's retries) cannot hold the process's exit.
        self._sender = threading.Thread(target=self._send, name="edgescope-archive-send", daemon=True)
        self._sender.start()
        self._lock = threading.Lock()
        self._batches_waiting = 0
        self._behind = False
        # Set once the server stops (monotonic clock): no delivery goes on past it.
        self._stop_by: float | None = None

    def started(self, capture: str, kind: SourceKind) -> None:
        """A capture's run begins, reading a source of ``kind``."""
        self._captures[capture] = _Capture(kind, self._recorder(kind))

    def sent(self, capture: str, seq: int, frame: SourceFrame) -> None:
        """Frame ``seq`` went to the model: kept until its answer, with its own copy of the pixels (a source
        may reuse its buffer)."""
        state = self._captures[capture]
        state.in_flight[seq] = dataclasses.replace(frame, pixels=frame.pixels.copy())
        while len(state.in_flight) > MAX_IN_FLIGHT:
            state.in_flight.popitem(last=False)

    def answered(self, capture: str, result: stream_pb2.Result) -> None:
        """A result of frame ``result.seq``: the recorder decides whether it is a key frame."""
        state = self._captures[capture]
        frame = state.in_flight.pop(result.seq, None)
        if frame is None or self._writing_behind():
            return
        state.recorder.observe(frame, result)
        if len(state.recorder.frames) >= self.settings.policy.max_frames:
            self._flush(capture, state)

    def ended(self, capture: str) -> None:
        """A capture's run ended: what it kept is written and delivered."""
        state = self._captures.pop(capture, None)
        if state is not None:
            self._flush(capture, state)

    def stopping(self) -> None:
        """The server stops: deliveries end within ``STOP_DELIVERY_S``."""
        self._stop_by = time.monotonic() + STOP_DELIVERY_S

    async def close(self) -> None:
        """Write what every capture kept, then wait for the last delivery, up to ``STOP_DELIVERY_S`` (a single
        try the archive holds longer is left to finish on its own; what it did not send waits in the outbox)."""
        for capture in list(self._captures):
            self.ended(capture)
        await asyncio.to_thread(self._writer.shutdown, wait=True)
        self._closing = True
        self._wanted.set()
        await asyncio.to_thread(self._sender.join, STOP_DELIVERY_S)
        if self._sender.is_alive():
            self._left = True
            logger.warning("the archive still holds a delivery at the stop; what it did not confirm waits in %s",
                           self.settings.outbox)  # fmt: skip

    def _recorder(self, kind: SourceKind, chooser: KeyFrameChooser | None = None) -> KeyFrameRecorder:
        return KeyFrameRecorder(
            self.settings.study,
            chooser or KeyFrameChooser(self.settings.policy),
            kind,
            self._label_codes,
            self.settings.seg_type,
        )

    def _flush(self, capture: str, state: _Capture) -> None:
        full, chooser = state.recorder, state.recorder.chooser
        if not full.frames:
            return
        # The next batch keeps the policy's clock, so a batch boundary takes no extra frame; its count starts anew.
        chooser.kept = 0
        state.recorder = self._recorder(state.kind, chooser)
        with self._lock:
            self._batches_waiting += 1
        self._writer.submit(self._write, capture, full)

    def _writing_behind(self) -> bool:
        with self._lock:
            behind = self._batches_waiting >= MAX_BATCHES_WAITING
        if behind != self._behind:
            self._behind = behind
            if behind:
                logger.warning("the captures' results are written more slowly than they come: no key frames now")
            else:
                logger.info("the captures' results are written again: key frames are taken")
        return behind

    def _write(self, capture: str, recorder: KeyFrameRecorder) -> None:
        """On the writing thread: the batch's objects into the outbox, each recorded; then a delivery."""
        model = recorder.kept.provenance.model
        try:
            report = recorder.write(self._outbox)
        # Nothing else sees this thread's errors: any failure to write (a full outbox, a disk error, a frame
        # the writers refuse) is logged and recorded, and the captures go on.
        except Exception as exc:
            # Another library's words may quote a value of the study context: only the project's own are kept.
            reason = str(exc) if isinstance(exc, EdgescopeError) else type(exc).__name__
            logger.error("capture %s: its results could not be written to the outbox: %s", capture, reason)
            if self._audit is not None:
                self._audit.append("archive_write_failed", by="server", capture=capture, model=model, reason=reason)
            return
        finally:
            with self._lock:
                self._batches_waiting -= 1
        if self._audit is not None:
            record_results(self._audit, report, by="server", model=model)
        self._wanted.set()

    def _send(self) -> None:
        """The delivering thread: a delivery whenever one is wanted, until the archive is closed."""
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self._deliver()
            if self._closing and not self._wanted.is_set():
                return

    def _deliver(self) -> None:
        """On the delivering thread: send what waits in the outbox, in tries of ``DELIVERY_SLICE_S``, until
        nothing waits, the delivery timeout is spent, or the server's stop allows no more."""
        settings = self.settings
        deadline = time.monotonic() + settings.delivery_timeout_s
        while True:
            until = min(deadline, self._stop_by or deadline)
            report = deliver_outbox(self._outbox, settings.url, min(DELIVERY_SLICE_S, until - time.monotonic()), {})
            done = not report["waiting"] or time.monotonic() >= until
            if self._audit is not None and not self._left:
                # Objects still waiting are recorded once, when this delivery leaves them.
                record_results(self._audit, {**report, "waiting": report["waiting"] if done else 0}, by="server",
                               model="")  # fmt: skip
            if report["delivered"]:
                logger.info("%d DICOM object(s) stored at %s", len(report["delivered"]), settings.url)
            if done:
                break
        if report["waiting"]:
            logger.warning(
                "%d DICOM object(s) wait in the outbox %s: %s", report["waiting"], settings.outbox, report["error"]
            )
