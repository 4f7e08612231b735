"""A stream's results -> DICOM objects in the outbox: one implementation for ``edgescope stream --results-to``
and for the server's captures (``edgescope serve --results-to``).

- A DICOM cine (``CineRecorder``): each answered frame's mask and quantities,
  or its class or boxes, are kept; at the end one Segmentation of the source
  series (``seg``) and, where areas were measured in physical units, a
  TID 1500 Measurement Report of them (``sr``); a classification's or a
  detection's findings go into a Measurement Report of their own
  (``sr_findings``), on the cine's frames.
- Either writes a BINARY Segmentation, or with ``seg_type`` ``fractional`` a
  FRACTIONAL one of the probabilities the runtime sent with each mask (the
  frames must have asked for them: ``StreamOptions.want_probabilities``); a
  result without them is refused at ``write``, never filled in.
- Any other source (``KeyFrameRecorder``): the key frames the policy chooses
  (``key_frames``) are kept, pixels and result, and written as Secondary
  Capture images in the study the study context names (``sc``), with a
  Segmentation of those images and its report, or the report of the findings
  on them.

Each label is coded as the bundle the results came from codes it (its
manifest's ``label_codes``): who asks for them is the caller's
(``LabelCodesFor``): the client asks the server, the server reads its own
registry. Without them, the writers' own rules apply.

``write`` puts the objects in the outbox (durable before it returns);
``deliver`` sends what waits there, bounded in time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import Dataset

from edgescope.errors import FrameError
from edgescope.runtime.archive.key_frames import KeyFrameChooser
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.sc import KeyFrame, key_images
from edgescope.runtime.archive.seg import Algorithm, Code, segmentation, segmentation_of_images, segments_for
from edgescope.runtime.archive.senders import sender_for
from edgescope.runtime.archive.sr import IMAGING, PROCEDURE, FrameMeasurement, measurement_report, outline_of
from edgescope.runtime.archive.sr_findings import Finding, findings_report
from edgescope.runtime.archive.study import StudyContext
from edgescope.runtime.pipeline.encode import decode_mask, decode_probabilities
from edgescope.runtime.sources.base import SourceFrame, SourceKind
from edgescope.v1 import stream_pb2

SR_CLASS = "Comprehensive 3D SR (TID 1500)"
# A segmentation model's labels when its results did not name them.
_DEFAULT_LABELS = ["background", "lesion"]
# How a recorder writes the masks as a Segmentation (``edgescope stream --seg-type``).
SEG_TYPES = ("binary", "fractional")

# The codes the bundle the results came from (its provenance) gives its labels, and where they came from in words.
LabelCodesFor = Callable[[stream_pb2.Provenance], tuple[dict[str, tuple[Code, Code]], str]]


def no_label_codes(provenance: stream_pb2.Provenance) -> tuple[dict[str, tuple[Code, Code]], str]:
    return {}, "default rule (no bundle to ask for its label codes)"


def first_mask(result: stream_pb2.Result) -> stream_pb2.Mask | None:
    """The mask of an answered frame's result, if it has one."""
    if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
        return None
    return next((output.mask for output in result.outputs if output.HasField("mask")), None)


def recordable(result: stream_pb2.Result) -> bool:
    """An answered frame whose result a report can hold: a mask, classes or boxes."""
    return result.status.code == stream_pb2.FRAME_STATUS_CODE_OK and any(
        output.WhichOneof("value") in ("mask", "classes", "boxes") for output in result.outputs
    )


def findings_of(frame: int, result: stream_pb2.Result, size: tuple[int, int]) -> list[Finding]:
    """The top class of each classification output, and every box (kept inside the frame of ``size``:
    rows, columns), of an answered frame's result, on source frame ``frame``."""
    if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
        return []
    rows, columns = size
    found = []
    for output in result.outputs:
        if output.HasField("classes") and output.classes.scores:
            top = int(np.argmax(output.classes.scores))
            label = output.classes.labels[top] if top < len(output.classes.labels) else f"class {top}"
            found.append(Finding(frame, label, output.classes.scores[top]))
        elif output.HasField("boxes"):
            for box in output.boxes.boxes:
                corners = (
                    min(max(box.x_min, 0.0), columns),
                    min(max(box.y_min, 0.0), rows),
                    min(max(box.x_max, 0.0), columns),
                    min(max(box.y_max, 0.0), rows),
                )
                found.append(Finding(frame, box.label or f"class {box.label_index}", box.score, corners))
    return found


def measured(
    frame: int, mask: npt.NDArray[np.uint8], quantities: Sequence[stream_pb2.Quantity], labels: Sequence[str]
) -> list[FrameMeasurement]:
    """Each label's area and diameter in the frame's physical units (summed over its calibrated regions)."""
    found = []
    for number, label in enumerate(labels[1:], start=1):
        areas = [q.value for q in quantities if q.name == f"{label}_area" and q.unit == "mm2"]
        diameters = [q.value for q in quantities if q.name == f"{label}_max_diameter" and q.unit == "mm"]
        outline = outline_of(mask == number)
        if sum(areas) > 0 and outline is not None:
            found.append(FrameMeasurement(frame, number, sum(areas), max(diameters, default=0.0), outline))
    return found


def algorithm_of(provenance: stream_pb2.Provenance) -> Algorithm:
    return Algorithm(provenance.model, provenance.version, provenance.sha256, provenance.signer)


def deliver_outbox(outbox: Outbox, url: str, timeout_s: float, report: dict[str, Any]) -> dict[str, Any]:
    """Send what waits in ``outbox`` to ``url`` (at most ``timeout_s``); ``report`` with what happened."""
    delivery = outbox.deliver(sender_for(url), timeout_s)
    report.update(to=url, delivered=delivery.sent, waiting=delivery.waiting, error=delivery.last_error)
    return report


def _put(outbox: Outbox, report: dict[str, Any], dataset: Dataset, sop_class: str) -> None:
    outbox.put(dataset)
    report["written"].append({"sop_class": sop_class, "sop_instance_uid": str(dataset.SOPInstanceUID)})


@dataclass(slots=True)
class _Kept:
    """What a recorder kept of its results: masks (with the labels they name), measurements and findings."""

    # (source frame or key image number, 1-based; label mask)
    masks: list[tuple[int, npt.NDArray[np.uint8]]] = field(default_factory=list)
    # Each mask's labels' probabilities (``decode_probabilities``; empty when its result had none).
    probabilities: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    measurements: list[FrameMeasurement] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    provenance: stream_pb2.Provenance = field(default_factory=stream_pb2.Provenance)

    def keep(self, frame: int, result: stream_pb2.Result, size: tuple[int, int]) -> None:
        self.provenance = result.provenance
        self.findings.extend(findings_of(frame, result, size))
        mask_message = first_mask(result)
        if mask_message is not None:
            mask = decode_mask(mask_message)
            self.masks.append((frame, mask))
            self.probabilities.append(decode_probabilities(mask_message))
            self.labels = list(mask_message.labels) or self.labels
            self.measurements.extend(measured(frame, mask, result.quantities, self.labels))

    def fractions(self, seg_type: str) -> list[npt.NDArray[np.uint8]] | None:
        """The probabilities a FRACTIONAL Segmentation is made of (None for BINARY); every mask must have come
        with its labels' probabilities, or there is nothing true to write."""
        if seg_type not in SEG_TYPES:
            raise FrameError(f"segmentation type {seg_type!r}: use one of {', '.join(SEG_TYPES)}")
        if seg_type == "binary":
            return None
        missing = [frame for (frame, _), plane in zip(self.masks, self.probabilities, strict=True) if not len(plane)]
        if missing:
            raise FrameError(
                f"a FRACTIONAL Segmentation needs each label's probabilities, and the results of frame(s) "
                f"{', '.join(map(str, missing[:5]))} carry none (ask with want_probabilities, from a server that "
                f"sends them; or write --seg-type binary)"
            )
        return self.probabilities


@dataclass(slots=True)
class CineRecorder:
    """Keeps the results of a DICOM cine's answered frames, then writes their Segmentation and reports."""

    source: Path
    label_codes: LabelCodesFor = no_label_codes
    seg_type: str = "binary"
    kept: _Kept = field(default_factory=_Kept)

    def observe(self, frame: SourceFrame, result: stream_pb2.Result) -> None:
        if recordable(result):
            self.kept.keep(frame.index + 1, result, frame.pixels.shape[:2])

    def write(self, outbox: Outbox) -> dict[str, Any]:
        """The Segmentation and reports, durably in ``outbox``; what was written."""
        report: dict[str, Any] = {"outbox": str(outbox.directory), "written": []}
        kept = self.kept
        if not kept.masks and not kept.findings:
            return report
        source = pydicom.dcmread(self.source, stop_before_pixels=True)
        algorithm = algorithm_of(kept.provenance)
        codes, said = self.label_codes(kept.provenance)
        if kept.masks:
            report["segment_codes"] = said
            segments = segments_for(kept.labels or _DEFAULT_LABELS, codes)
            seg = segmentation(source, kept.masks, segments, algorithm, probabilities=kept.fractions(self.seg_type))
            _put(outbox, report, seg, "Segmentation")
            if kept.measurements:
                _put(outbox, report, measurement_report(source, seg, kept.measurements, algorithm), SR_CLASS)
        if kept.findings:
            report["finding_codes"] = said
            _put(outbox, report, findings_report(source, kept.findings, algorithm, label_codes=codes), SR_CLASS)
        return report

    def deliver(self, url: str, outbox: Outbox, timeout_s: float) -> dict[str, Any]:
        """``write``, then send what waits in ``outbox`` to ``url``; what happened."""
        sender_for(url)  # a wrong URL is refused before anything is written
        return deliver_outbox(outbox, url, timeout_s, self.write(outbox))


@dataclass(slots=True)
class KeyFrameRecorder:
    """Keeps the key frames of a source that is not DICOM (pixels and result), then writes them as Secondary
    Capture images in the given study, with their Segmentation and reports."""

    study: StudyContext
    chooser: KeyFrameChooser
    source_kind: SourceKind
    label_codes: LabelCodesFor = no_label_codes
    seg_type: str = "binary"
    frames: list[KeyFrame] = field(default_factory=list)
    kept: _Kept = field(default_factory=_Kept)

    def observe(self, frame: SourceFrame, result: stream_pb2.Result) -> None:
        reason = self.chooser.choose(frame, result)
        if reason is None or not recordable(result):
            return
        # Only a chosen frame costs anything: its pixels copied (a source may reuse its buffer), its mask decoded.
        self.frames.append(
            KeyFrame(frame.index, frame.pixels.copy(), datetime.now(), frame.timestamp_s, frame.spacing_mm, reason)
        )
        self.kept.keep(len(self.frames), result, frame.pixels.shape[:2])

    def write(self, outbox: Outbox) -> dict[str, Any]:
        """The key images, their Segmentation and reports, durably in ``outbox``; what was written."""
        report: dict[str, Any] = {
            "outbox": str(outbox.directory),
            "written": [],
            "key_frames": {
                "policy": str(self.chooser.policy),
                "kept": len(self.frames),
                "over_the_limit": self.chooser.over_limit,
            },
        }
        if not self.frames:
            return report
        kept = self.kept
        # Refused before anything is written: the key images without their Segmentation would be half an answer.
        fractions = kept.fractions(self.seg_type) if kept.masks else None
        images = key_images(self.frames, self.study, self.source_kind)
        for image in images:
            _put(outbox, report, image, "Secondary Capture")
        algorithm = algorithm_of(kept.provenance)
        codes, said = self.label_codes(kept.provenance)
        procedure = PROCEDURE.get(self.source_kind, IMAGING)
        if kept.masks:
            report["segment_codes"] = said
            masked = [images[frame - 1] for frame, _ in kept.masks]
            masks = [mask for _, mask in kept.masks]
            segments = segments_for(kept.labels or _DEFAULT_LABELS, codes)
            seg = segmentation_of_images(
                masked, masks, segments, algorithm, probabilities=fractions, new_uid=self.study.new_uid
            )
            _put(outbox, report, seg, "Segmentation")
            if kept.measurements:
                sr = measurement_report(
                    images, seg, kept.measurements, algorithm, procedure=procedure, new_uid=self.study.new_uid
                )
                _put(outbox, report, sr, SR_CLASS)
        if kept.findings:
            report["finding_codes"] = said
            sr = findings_report(
                images, kept.findings, algorithm, label_codes=codes, procedure=procedure, new_uid=self.study.new_uid
            )
            _put(outbox, report, sr, SR_CLASS)
        return report

    def deliver(self, url: str, outbox: Outbox, timeout_s: float) -> dict[str, Any]:
        """``write``, then send what waits in ``outbox`` to ``url``; what happened."""
        sender_for(url)  # a wrong URL is refused before anything is written
        return deliver_outbox(outbox, url, timeout_s, self.write(outbox))
