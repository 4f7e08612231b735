"""``edgescope stream --results-to URL``: a stream's results become DICOM objects in the archive.

- A DICOM cine (``dicom:`` source): the client keeps each answered frame's
  mask and its quantities, and when the stream ends writes one DICOM
  Segmentation of the source series (``archive.seg``) and, where areas were
  measured in physical units, a TID 1500 Measurement Report of them
  (``archive.sr``).
- Any other source (video, camera, network, synthetic): the key frames the
  policy chooses (``key_frames``) are kept, pixels and mask, and written as
  Secondary Capture images in the study the study context names
  (``archive.sc``), with a Segmentation of those images and, where the source
  was calibrated, a Measurement Report.

Each segment is coded as the bundle codes its label (its manifest's
``label_codes``, asked of the server by GetModel when the stream ends, and
used only when the server still serves the bundle the results came from),
else by the Segmentation writer's own rule.

Either way the objects go into the durable outbox and are delivered (bounded
in time); what could not be delivered waits there for ``edgescope outbox send``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import Dataset

from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.sc import KeyFrame, key_images
from edgescope.runtime.archive.seg import (
    Algorithm,
    Code,
    label_codes_of,
    segmentation,
    segmentation_of_images,
    segments_for,
)
from edgescope.runtime.archive.senders import sender_for
from edgescope.runtime.archive.sr import IMAGING, PROCEDURE, FrameMeasurement, measurement_report, outline_of
from edgescope.runtime.archive.study import StudyContext
from edgescope.runtime.client.key_frames import KeyFrameChooser
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.sources.base import SourceFrame, SourceKind
from edgescope.runtime.transport import ClientSecurity, sync_channel
from edgescope.v1 import stream_pb2, stream_pb2_grpc


def dicom_source(spec: str) -> Path | None:
    """The file a ``dicom:PATH[?options]`` source reads; None for any other source."""
    scheme, _, rest = spec.partition(":")
    if scheme.strip().lower() != "dicom":
        return None
    return Path(rest.partition("?")[0]).expanduser()


def first_mask(result: stream_pb2.Result) -> stream_pb2.Mask | None:
    """The mask of an answered frame's result, if it has one."""
    if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
        return None
    return next((output.mask for output in result.outputs if output.HasField("mask")), None)


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


def _algorithm(provenance: stream_pb2.Provenance) -> Algorithm:
    return Algorithm(provenance.model, provenance.version, provenance.sha256, provenance.signer)


def bundle_label_codes(
    target: str, security: ClientSecurity | None, provenance: stream_pb2.Provenance, timeout_s: float = 5.0
) -> tuple[dict[str, tuple[Code, Code]], str]:
    """The label codes of the bundle the results came from, asked of the server (GetModel), and where the
    segments' codes came from in words; no codes when the server cannot say, or now serves another bundle."""
    if not target or not provenance.model:
        return {}, "default rule (no server to ask for the bundle's label codes)"
    try:
        with sync_channel(target, security or ClientSecurity()) as channel:
            info = stream_pb2_grpc.StreamServiceStub(channel).GetModel(
                stream_pb2.GetModelRequest(name=provenance.model), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return {}, f"default rule (GetModel {provenance.model}: {exc.code().name}: {exc.details()})"
    if provenance.sha256 and info.provenance.sha256 and info.provenance.sha256 != provenance.sha256:
        return {}, f"default rule (the server now serves another bundle of {provenance.model})"
    codes = label_codes_of(info.manifest)
    return codes, "bundle" if codes else "default rule (the bundle gives no label codes)"


def _put(outbox: Outbox, report: dict[str, Any], dataset: Dataset, sop_class: str) -> None:
    outbox.put(dataset)
    report["written"].append({"sop_class": sop_class, "sop_instance_uid": str(dataset.SOPInstanceUID)})


def _deliver(outbox: Outbox, url: str, timeout_s: float, report: dict[str, Any]) -> dict[str, Any]:
    delivery = outbox.deliver(sender_for(url), timeout_s)
    report.update(delivered=delivery.sent, waiting=delivery.waiting, error=delivery.last_error)
    return report


@dataclass(slots=True)
class SegmentationRecorder:
    """Keeps the masks of a DICOM cine's answered frames, then writes, queues and delivers their Segmentation."""

    source: Path
    masks: list[tuple[int, npt.NDArray[np.uint8]]] = field(default_factory=list)
    measurements: list[FrameMeasurement] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    provenance: stream_pb2.Provenance = field(default_factory=stream_pb2.Provenance)
    # The server the results came from: asked for the bundle's label codes ("": the default rule).
    target: str = ""
    security: ClientSecurity | None = None

    def observe(self, frame: SourceFrame, result: stream_pb2.Result) -> None:
        mask_message = first_mask(result)
        if mask_message is None:
            return
        mask = decode_mask(mask_message)
        self.masks.append((frame.index + 1, mask))
        self.labels = list(mask_message.labels) or self.labels
        self.provenance = result.provenance
        self.measurements.extend(measured(frame.index + 1, mask, result.quantities, self.labels))

    def deliver(self, url: str, outbox: Outbox, timeout_s: float) -> dict[str, Any]:
        """Write the Segmentation into ``outbox`` and send what waits there to ``url``; what happened."""
        report: dict[str, Any] = {"to": url, "outbox": str(outbox.directory), "written": []}
        sender_for(url)  # a wrong URL is refused before anything is written
        if self.masks:
            source = pydicom.dcmread(self.source, stop_before_pixels=True)
            algorithm = _algorithm(self.provenance)
            codes, report["segment_codes"] = bundle_label_codes(self.target, self.security, self.provenance)
            segments = segments_for(self.labels or ["background", "lesion"], codes)
            seg = segmentation(source, self.masks, segments, algorithm)
            _put(outbox, report, seg, "Segmentation")
            if self.measurements:
                sr = measurement_report(source, seg, self.measurements, algorithm)
                _put(outbox, report, sr, "Comprehensive 3D SR (TID 1500)")
        return _deliver(outbox, url, timeout_s, report)


@dataclass(slots=True)
class KeyFrameRecorder:
    """Keeps the key frames of a source that is not DICOM (pixels and mask), then writes them as Secondary
    Capture images in the given study, with their Segmentation, and queues and delivers them."""

    study: StudyContext
    chooser: KeyFrameChooser
    source_kind: SourceKind
    frames: list[KeyFrame] = field(default_factory=list)
    masks: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    measurements: list[FrameMeasurement] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    provenance: stream_pb2.Provenance = field(default_factory=stream_pb2.Provenance)
    target: str = ""
    security: ClientSecurity | None = None

    def observe(self, frame: SourceFrame, result: stream_pb2.Result) -> None:
        mask_message = first_mask(result)
        reason = self.chooser.choose(frame, result)
        if mask_message is None or reason is None:
            return
        # Only a chosen frame costs anything: its mask decoded, its pixels copied (a source may reuse its buffer).
        mask = decode_mask(mask_message)
        self.frames.append(
            KeyFrame(frame.index, frame.pixels.copy(), datetime.now(), frame.timestamp_s, frame.spacing_mm, reason)
        )
        self.masks.append(mask)
        self.labels = list(mask_message.labels) or self.labels
        self.provenance = result.provenance
        self.measurements.extend(measured(len(self.frames), mask, result.quantities, self.labels))

    def deliver(self, url: str, outbox: Outbox, timeout_s: float) -> dict[str, Any]:
        """Write the key images and their Segmentation into ``outbox`` and send what waits there; what happened."""
        report: dict[str, Any] = {
            "to": url,
            "outbox": str(outbox.directory),
            "written": [],
            "key_frames": {
                "policy": str(self.chooser.policy),
                "kept": len(self.frames),
                "over_the_limit": self.chooser.over_limit,
            },
        }
        sender_for(url)  # a wrong URL is refused before anything is written
        if self.frames:
            images = key_images(self.frames, self.study, self.source_kind)
            for image in images:
                _put(outbox, report, image, "Secondary Capture")
            algorithm = _algorithm(self.provenance)
            labels = self.labels or ["background", "lesion"]
            codes, report["segment_codes"] = bundle_label_codes(self.target, self.security, self.provenance)
            seg = segmentation_of_images(
                images, self.masks, segments_for(labels, codes), algorithm, new_uid=self.study.new_uid
            )
            _put(outbox, report, seg, "Segmentation")
            if self.measurements:
                procedure = PROCEDURE.get(self.source_kind, IMAGING)
                sr = measurement_report(
                    images, seg, self.measurements, algorithm, procedure=procedure, new_uid=self.study.new_uid
                )
                _put(outbox, report, sr, "Comprehensive 3D SR (TID 1500)")
        return _deliver(outbox, url, timeout_s, report)
