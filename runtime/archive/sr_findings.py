"""Classification and detection results -> a TID 1500 Measurement Report (highdicom) of findings on source frames.

- A classification: for each analysed (or key) frame, a measurement group
  (TID 1501) on that frame (Source Image, with its frame number in a
  multi-frame source) whose coded "Finding" (the template's row for what was
  found, which readers such as highdicom take as the group's finding type) is
  the top class, with the model's score for it as "Certainty of Finding".
- A detection: for each box, a planar ROI group (TID 1410) whose region is the
  box as a closed POLYLINE (SCOORD, in the source frame's pixels: column, row),
  whose finding type is the box's label, with its score as "Certainty of Finding".

A score is the model's output, not a calibrated probability: it is written
as a number without unit (UCUM ``1``), under "Certainty of Finding" rather
than "Probability". A label is coded as the bundle codes it (its manifest's
``label_codes``: the type as the finding's, the category as its Finding
Category), else in the local scheme ``99EDGESCOPE`` with the
label as both code value (a short hash where the label passes the 16
characters a code value may hold) and meaning; the report then identifies
that scheme (Coding Scheme Identification Sequence), as PS3.3 C.12.1 asks of
a private scheme.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from edgescope.runtime.archive.seg import MANUFACTURER, Algorithm, LabelCodes
from edgescope.runtime.archive.sr import PROCEDURE, Group, report_of, source_reference

LOCAL_SCHEME = "99EDGESCOPE"
# A code value is SH: at most 16 characters (PS3.5 6.2).
_CODE_VALUE_MAX = 16
_CERTAINTY = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
_NO_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")


@dataclass(frozen=True, slots=True)
class Finding:
    """What the model found on one source frame (1-based, as in ``sr.FrameMeasurement``): a class, or a box
    (x_min, y_min, x_max, y_max in the frame's pixels) of a label, with the model's score for it."""

    frame: int
    label: str
    score: float
    box: tuple[float, float, float, float] | None = None


def label_category(label: str, label_codes: LabelCodes | None = None) -> hd.sr.CodedConcept | None:
    """The bundle's category for ``label`` (the finding's category), None where it gives none."""
    if not label_codes or label not in label_codes:
        return None
    code = label_codes[label][0]
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def label_concept(label: str, label_codes: LabelCodes | None = None) -> hd.sr.CodedConcept:
    """The bundle's code for ``label`` (its type), else a code of the local scheme (see the module docstring)."""
    if label_codes and label in label_codes:
        code = label_codes[label][1]
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
    value = label if len(label) <= _CODE_VALUE_MAX else hashlib.sha256(label.encode()).hexdigest()[:_CODE_VALUE_MAX]
    return hd.sr.CodedConcept(value, LOCAL_SCHEME, label[:64])


def rectangle(box: tuple[float, float, float, float]) -> np.ndarray:
    """A box as a closed polyline of (column, row) corners: the first corner repeated last."""
    x_min, y_min, x_max, y_max = box
    return np.array([[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max], [x_min, y_min]], np.float32)


def findings_report(
    source: Dataset | Sequence[Dataset],
    findings: Sequence[Finding],
    algorithm: Algorithm,
    *,
    label_codes: LabelCodes | None = None,
    procedure: hd.sr.CodedConcept = PROCEDURE["ultrasound"],
    series_number: int = 903,
    new_uid: Callable[[], str] = generate_uid,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report of ``findings`` on ``source``: one multi-frame instance, or single-frame key images
    (a finding's frame k is the k-th); ``new_uid`` makes the report's UIDs."""
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    groups: list[Group] = []
    for number, found in enumerate(findings, start=1):
        concept, category = label_concept(found.label, label_codes), label_category(found.label, label_codes)
        certainty = hd.sr.Measurement(_CERTAINTY, found.score, _NO_UNIT, algorithm_id=algorithm_id)
        tracking = hd.sr.TrackingIdentifier(uid=new_uid(), identifier=f"finding {number} frame {found.frame}")
        if found.box is None:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=concept,
                    finding_category=category,
                    algorithm_id=algorithm_id,
                    measurements=[certainty],
                    source_images=[source_reference(hd.sr.SourceImageForMeasurementGroup, source, found.frame)],
                )
            )
        else:
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=rectangle(found.box),
                source_image=source_reference(hd.sr.SourceImageForRegion, source, found.frame),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=region,
                    finding_type=concept,
                    finding_category=category,
                    algorithm_id=algorithm_id,
                    measurements=[certainty],
                )
            )
    evidence = [source] if isinstance(source, Dataset) else list(source)
    report = report_of(evidence, groups, algorithm, procedure=procedure, series_number=series_number, new_uid=new_uid)
    if any(found.label not in (label_codes or {}) for found in findings):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = LOCAL_SCHEME
        scheme.CodingSchemeName = "edgescope model labels"
        scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
        report.CodingSchemeIdentificationSequence = [scheme]
    return report
