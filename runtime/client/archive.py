"""``edgescope stream --results-to URL``: a DICOM cine's masks become a Segmentation in the archive.

The client keeps each answered frame's mask and its quantities, and when the
stream ends writes one DICOM Segmentation of the source series
(``archive.seg``) and, where areas were measured in physical units, a TID 1500
Measurement Report of them (``archive.sr``), puts both in the durable outbox
and delivers them (bounded in time); what could not be delivered waits there
for ``edgescope outbox send``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

from edgescope.errors import ConfigError
from edgescope.runtime.archive.outbox import Outbox
from edgescope.runtime.archive.seg import Algorithm, segmentation, segments_for
from edgescope.runtime.archive.senders import sender_for
from edgescope.runtime.archive.sr import FrameMeasurement, measurement_report, outline_of
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.sources.base import SourceFrame
from edgescope.v1 import stream_pb2


def dicom_path(spec: str) -> Path:
    """The file a ``dicom:PATH[?options]`` source reads; results to an archive need a DICOM source."""
    scheme, _, rest = spec.partition(":")
    if scheme.strip().lower() != "dicom":
        raise ConfigError(
            "--results-to writes a DICOM Segmentation of the source series, so it needs a dicom: source; "
            "key images of other sources are not written yet"
        )
    return Path(rest.partition("?")[0]).expanduser()


@dataclass(slots=True)
class SegmentationRecorder:
    """Keeps the masks of a DICOM cine's answered frames, then writes, queues and delivers their Segmentation."""

    source: Path
    masks: list[tuple[int, npt.NDArray[np.uint8]]] = field(default_factory=list)
    measurements: list[FrameMeasurement] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    provenance: stream_pb2.Provenance = field(default_factory=stream_pb2.Provenance)

    def observe(self, frame: SourceFrame, result: stream_pb2.Result) -> None:
        if result.status.code != stream_pb2.FRAME_STATUS_CODE_OK:
            return
        for output in result.outputs:
            if output.HasField("mask"):
                mask = decode_mask(output.mask)
                self.masks.append((frame.index + 1, mask))
                self.labels = list(output.mask.labels) or self.labels
                self.provenance = result.provenance
                self._measure(frame.index + 1, mask, result.quantities)
                return

    def _measure(self, frame: int, mask: npt.NDArray[np.uint8], quantities: Sequence[stream_pb2.Quantity]) -> None:
        """A label's area and diameter in the frame's physical units (summed over its calibrated regions)."""
        for number, label in enumerate(self.labels[1:], start=1):
            areas = [q.value for q in quantities if q.name == f"{label}_area" and q.unit == "mm2"]
            diameters = [q.value for q in quantities if q.name == f"{label}_max_diameter" and q.unit == "mm"]
            outline = outline_of(mask == number)
            if sum(areas) > 0 and outline is not None:
                self.measurements.append(
                    FrameMeasurement(frame, number, sum(areas), max(diameters, default=0.0), outline)
                )

    def deliver(self, url: str, outbox: Outbox, timeout_s: float) -> dict[str, Any]:
        """Write the Segmentation into ``outbox`` and send what waits there to ``url``; what happened."""
        report: dict[str, Any] = {"to": url, "outbox": str(outbox.directory), "written": []}
        send = sender_for(url)
        if self.masks:
            source = pydicom.dcmread(self.source, stop_before_pixels=True)
            provenance = self.provenance
            algorithm = Algorithm(provenance.model, provenance.version, provenance.sha256, provenance.signer)
            seg = segmentation(source, self.masks, segments_for(self.labels or ["background", "lesion"]), algorithm)
            outbox.put(seg)
            report["written"].append({"sop_class": "Segmentation", "sop_instance_uid": str(seg.SOPInstanceUID)})
            if self.measurements:
                sr = measurement_report(source, seg, self.measurements, algorithm)
                outbox.put(sr)
                report["written"].append(
                    {"sop_class": "Comprehensive 3D SR (TID 1500)", "sop_instance_uid": str(sr.SOPInstanceUID)}
                )
        delivery = outbox.deliver(send, timeout_s)
        report.update(delivered=delivery.sent, waiting=delivery.waiting, error=delivery.last_error)
        return report
