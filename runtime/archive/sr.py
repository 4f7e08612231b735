"""Measured quantities -> a TID 1500 Measurement Report (highdicom), each referencing the Segmentation's segment
on its frame.

One report per Segmentation: for every analysed frame where a label was
measured in physical units, a planar ROI group (tracking identifier, the
region measured as a polygon on its source frame: SCOORD, in the frame's
pixels, the Segmentation in the report's evidence) with the area (UCUM
``mm2``) and the largest diameter (``mm``) the runtime measured inside the
frame's calibrated regions. Quantities in pixels are left out: a report never
invents a pixel spacing. The algorithm is named in each group (Algorithm
Identification) and the device in the observation context.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from edgescope import __version__
from edgescope.runtime.archive.seg import MANUFACTURER, Algorithm

# The procedure a report is of, by the kind of source its images came from (SNOMED CT).
PROCEDURE = {
    "ultrasound": hd.sr.CodedConcept("16310003", "SCT", "Ultrasonography"),
    "endoscopy": hd.sr.CodedConcept("423827005", "SCT", "Endoscopy"),
    "fluoroscopy": hd.sr.CodedConcept("44491008", "SCT", "Fluoroscopy"),
}
IMAGING = hd.sr.CodedConcept("363679005", "SCT", "Imaging")
_AREA = hd.sr.CodedConcept("42798000", "SCT", "Area")
_DIAMETER = hd.sr.CodedConcept("81827009", "SCT", "Diameter")
# The kinds of image reference a report makes: a region's source image, a measurement group's.
_Reference = TypeVar("_Reference", hd.sr.SourceImageForRegion, hd.sr.SourceImageForMeasurementGroup)
# A measurement group of a report: on an image (TID 1501) or on a region of one (TID 1410).
Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
_UNITS = {
    "mm2": hd.sr.CodedConcept("mm2", "UCUM", "square millimeter"),
    "mm": hd.sr.CodedConcept("mm", "UCUM", "millimeter"),
}


@dataclass(frozen=True, slots=True)
class FrameMeasurement:
    """One label's measurements on one source frame (1-based), in the frame's physical units, and the
    outline of what was measured: a closed polygon of (column, row) pixel coordinates on that frame.
    The frame is a frame of a multi-frame source, or the k-th of several single-frame key images."""

    frame: int
    segment: int
    area_mm2: float
    diameter_mm: float
    outline: npt.NDArray[np.float32]


def outline_of(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32] | None:
    """The outer contour of the largest part of ``mask``, closed, as (column, row); None when it is empty."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    points = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32)
    if len(points) < 3:
        return None
    return np.concatenate([points, points[:1]])


def measurement_report(
    source: Dataset | Sequence[Dataset],
    segmentation: Dataset,
    measurements: Sequence[FrameMeasurement],
    algorithm: Algorithm,
    *,
    procedure: hd.sr.CodedConcept = PROCEDURE["ultrasound"],
    series_number: int = 901,
    new_uid: Callable[[], str] = generate_uid,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of ``measurements``, referencing ``segmentation`` (of ``source``) frame by frame.

    ``source`` is one multi-frame instance, or single-frame key images (a measurement's frame k is the k-th);
    ``new_uid`` makes the report's UIDs (under the organisation's root, for one).
    """
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    groups = []
    for measured in measurements:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=measured.outline,
            source_image=source_reference(hd.sr.SourceImageForRegion, source, measured.frame),
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=new_uid(), identifier=f"segment {measured.segment} frame {measured.frame}"
                ),
                referenced_region=region,
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(_AREA, measured.area_mm2, _UNITS["mm2"], algorithm_id=algorithm_id),
                    hd.sr.Measurement(_DIAMETER, measured.diameter_mm, _UNITS["mm"], algorithm_id=algorithm_id),
                ],
            )
        )
    evidence = [source, segmentation] if isinstance(source, Dataset) else [*source, segmentation]
    return report_of(evidence, groups, algorithm, procedure=procedure, series_number=series_number, new_uid=new_uid)


def source_reference(kind: type[_Reference], source: Dataset | Sequence[Dataset], frame: int) -> _Reference:
    """A reference to frame ``frame`` (1-based) of ``source``: a frame of one multi-frame instance, or the
    ``frame``-th of several single-frame key images."""
    if isinstance(source, Dataset):
        return kind(source.SOPClassUID, source.SOPInstanceUID, referenced_frame_numbers=[frame])
    image = source[frame - 1]
    return kind(image.SOPClassUID, image.SOPInstanceUID)


def report_of(
    evidence: Sequence[Dataset],
    groups: Sequence[Group],
    algorithm: Algorithm,
    *,
    procedure: hd.sr.CodedConcept,
    series_number: int,
    new_uid: Callable[[], str],
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of ``groups``, by the device running ``algorithm``, citing ``evidence``."""
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=new_uid(), name=f"{MANUFACTURER} {__version__}", model_name=algorithm.name
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    with warnings.catch_warnings():
        # The patient's name is the source's, copied as it is: highdicom's advice on its form is not ours to take.
        warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=new_uid(),
            series_number=series_number,
            sop_instance_uid=new_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            # UTF-8: names copied from the evidence are kept in whatever script they are written.
            specific_character_set="ISO_IR 192",
        )
