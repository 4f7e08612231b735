"""Masks -> a DICOM Segmentation of the frames they were found on: BINARY, or FRACTIONAL (PROBABILITY) from
the runtime's 8-bit probabilities when they were asked for (``Frame.want_probabilities``).

Written with pydicom because the common ultrasound case, a multi-frame cine
without a Frame of Reference, is the one highdicom refuses. PS3.3 A.51.5.1
says how such a Segmentation points back at its source: each frame carries a
Derivation Image Sequence whose Source Image Sequence names the source
instance and its Referenced Frame Number (purpose of reference 121322,
"Source image for image processing operation"; derivation 113076,
"Segmentation"). Without a frame of reference the frames' one dimension is
the segment number; the source frame each came from is its reference. Rows and columns are the source's; every source
frame analysed has one frame per segment (empty where nothing was found), so
frame k of the source is frame k of each segment's block. A FRACTIONAL one holds
each segment's probability as the runtime sent it (8 bits, Maximum Fractional
Value 255), so a reader gets back exactly the values the runtime returned. Key images of a
source that is not DICOM (single-frame Secondary Captures, which have no
frame of reference either) are referenced the same way, by instance:
``segmentation_of_images``.

Each segment's Segmented Property Category and Type are the codes the bundle
gives its label (``edgescope export --label-codes``; the manifest's
``label_codes``), or without them: a label ``lesion`` is SCT "Morphologically
Altered Structure" / "Lesion", any other SCT "Tissue".

The algorithm is identified as IHE AI Results asks: Segment Algorithm Type
AUTOMATIC with its name, the Algorithm Identification (family "Artificial
Intelligence", name and version), and Contributing Equipment naming the bundle's
sha256 and signer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom import Sequence as DicomSequence
from pydicom.dataset import FileMetaDataset
from pydicom.pixels.utils import pack_bits
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from edgescope import __version__
from edgescope.errors import FrameError
from edgescope.v1 import manifest_pb2

SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
MANUFACTURER = "edgescope"
# Copied from the source so the Segmentation files beside it, in its study (PS3.3 C.7.1.1, C.7.2.1).
_PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept: SNOMED CT ("SCT") or DICOM ("DCM")."""

    value: str
    scheme: str
    meaning: str

    def item(self) -> Dataset:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = self.value, self.scheme, self.meaning
        return code


LESION = (Code("49755003", "SCT", "Morphologically Altered Structure"), Code("52988006", "SCT", "Lesion"))
TISSUE = (Code("85756007", "SCT", "Tissue"), Code("85756007", "SCT", "Tissue"))


@dataclass(frozen=True, slots=True)
class Segment:
    """One label of a mask: its number in the mask, its name and its coded category and type."""

    number: int
    label: str
    category: Code
    type: Code


# A label's Segmented Property Category and Type.
LabelCodes = Mapping[str, tuple[Code, Code]]


def label_codes_of(manifest: manifest_pb2.ModelManifest) -> dict[str, tuple[Code, Code]]:
    """The codes a bundle gives its labels (``edgescope export --label-codes``); empty when it gives none."""
    return {
        entry.label: (
            Code(entry.category.value, entry.category.scheme, entry.category.meaning),
            Code(entry.type.value, entry.type.scheme, entry.type.meaning),
        )
        for entry in manifest.label_codes
    }


def segments_for(labels: Sequence[str], codes: LabelCodes | None = None) -> list[Segment]:
    """Segments for a model's labels (label 0 is background), coded as ``codes`` (the bundle's) give them;
    a label without: "lesion" coded as a lesion, the rest as tissue."""
    codes = codes or {}
    return [
        Segment(number, label, *codes.get(label, LESION if label.lower() == "lesion" else TISSUE))
        for number, label in enumerate(labels)
        if number > 0
    ]


@dataclass(frozen=True, slots=True)
class Algorithm:
    """What produced the masks: the model's name and version, and the bundle it ran from."""

    name: str
    version: str
    bundle_sha256: str
    signer: str = ""


def segmentation(
    source: Dataset,
    masks: Sequence[tuple[int, npt.NDArray[np.uint8]]],
    segments: Sequence[Segment],
    algorithm: Algorithm,
    *,
    probabilities: Sequence[npt.NDArray[np.uint8]] | None = None,
    series_number: int = 900,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A Segmentation of ``source``: ``masks`` are (source frame number, 1-based; label mask). BINARY, or
    with ``probabilities`` FRACTIONAL: array k holds each segment's probability (v/255) on mask k's frame,
    ``(segments, rows, columns)``."""
    planes = _planes([mask for _, mask in masks], segments, probabilities)
    references = [(source, frame_number, plane) for (frame_number, _), plane in zip(masks, planes, strict=True)]
    return _segmentation(
        references,
        segments,
        algorithm,
        series_number,
        sop_instance_uid or generate_uid(),
        generate_uid,
        fractional=probabilities is not None,
    )


def segmentation_of_images(
    images: Sequence[Dataset],
    masks: Sequence[npt.NDArray[np.uint8]],
    segments: Sequence[Segment],
    algorithm: Algorithm,
    *,
    probabilities: Sequence[npt.NDArray[np.uint8]] | None = None,
    series_number: int = 900,
    new_uid: Callable[[], str] = generate_uid,
) -> Dataset:
    """A Segmentation of single-frame ``images`` (key images of one study): mask k is of image k; BINARY,
    or FRACTIONAL with ``probabilities`` (as for ``segmentation``).

    ``new_uid`` makes its UIDs (under the organisation's root, for one).
    """
    if len(images) != len(masks):
        raise FrameError(f"{len(masks)} masks for {len(images)} images: a Segmentation needs one mask per image")
    planes = _planes(masks, segments, probabilities)
    references = [(image, None, plane) for image, plane in zip(images, planes, strict=True)]
    return _segmentation(
        references, segments, algorithm, series_number, new_uid(), new_uid, fractional=probabilities is not None
    )


def _planes(
    masks: Sequence[npt.NDArray[np.uint8]],
    segments: Sequence[Segment],
    probabilities: Sequence[npt.NDArray[np.uint8]] | None,
) -> list[npt.NDArray[np.uint8]]:
    """Each analysed frame's segments, ``(segments, rows, columns)``: 0/1 from its mask (BINARY), or the
    probabilities as they are (FRACTIONAL), which must be there for every frame and segment."""
    if probabilities is None:
        return [np.stack([mask == segment.number for segment in segments]).astype(np.uint8) for mask in masks]
    if len(probabilities) != len(masks):
        raise FrameError(f"probabilities for {len(probabilities)} of {len(masks)} frames: FRACTIONAL needs all")
    for mask, plane in zip(masks, probabilities, strict=True):
        if plane.shape != (len(segments), *mask.shape):
            raise FrameError(
                f"probabilities of shape {plane.shape} for {len(segments)} segments on a {mask.shape} mask"
            )
    return [np.asarray(plane, np.uint8) for plane in probabilities]


# What a frame's segments are of: an instance, and its frame number (1-based) when it has several frames;
# the segments' planes, ``(segments, rows, columns)``.
_Reference = tuple[Dataset, int | None, npt.NDArray[np.uint8]]


def _segmentation(
    references: Sequence[_Reference],
    segments: Sequence[Segment],
    algorithm: Algorithm,
    series_number: int,
    sop_instance_uid: str,
    new_uid: Callable[[], str],
    *,
    fractional: bool,
) -> Dataset:
    if not references or not segments:
        raise FrameError("a Segmentation needs at least one analysed frame and one segment")
    source = references[0][0]
    rows, columns = int(source.Rows), int(source.Columns)
    for image, frame_number, planes in references:
        if planes.shape[1:] != (rows, columns) or (int(image.Rows), int(image.Columns)) != (rows, columns):
            where = f"frame {frame_number}" if frame_number is not None else f"image {image.SOPInstanceUID}"
            raise FrameError(f"the mask of {where} is {planes.shape[1:]}; the source is {(rows, columns)}")
    now = datetime.now(timezone.utc)
    seg = Dataset()
    seg.file_meta = FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg.file_meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    seg.SOPClassUID = SEGMENTATION_STORAGE
    seg.SOPInstanceUID = sop_instance_uid
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 192")
    for keyword in _PATIENT_AND_STUDY:
        setattr(seg, keyword, source.get(keyword, ""))
    seg.Modality = "SEG"
    seg.SeriesInstanceUID = new_uid()
    seg.SeriesNumber = series_number
    seg.InstanceNumber = 1
    seg.ContentDate, seg.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    seg.SeriesDescription = f"{algorithm.name} segmentation"
    _equipment(seg, algorithm)
    seg.ImageType = ["DERIVED", "PRIMARY"]
    seg.ContentLabel = "SEGMENTATION"
    seg.ContentDescription = f"{algorithm.name} {algorithm.version}"[:64]
    seg.ContentCreatorName = ""
    seg.SegmentationType = "FRACTIONAL" if fractional else "BINARY"
    if fractional:
        # The runtime's 8-bit probabilities as they came: v/255.
        seg.SegmentationFractionalType = "PROBABILITY"
        seg.MaximumFractionalValue = 255
    seg.SegmentSequence = DicomSequence([_segment(segment, algorithm) for segment in segments])
    seg.SamplesPerPixel, seg.PhotometricInterpretation = 1, "MONOCHROME2"
    seg.Rows, seg.Columns = rows, columns
    bits = 8 if fractional else 1
    seg.BitsAllocated, seg.BitsStored, seg.HighBit, seg.PixelRepresentation = bits, bits, bits - 1, 0
    seg.LossyImageCompression = "00"
    # No frame of reference: the orientation is that of the source's own frames.
    seg.PatientOrientation = ""
    _dimensions(seg, new_uid())
    frames = [
        (segment, image, number, planes[index])
        for index, segment in enumerate(segments)
        for image, number, planes in references
    ]
    seg.NumberOfFrames = len(frames)
    seg.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
    seg.PerFrameFunctionalGroupsSequence = DicomSequence(
        [_frame_groups(image, segment.number, number) for segment, image, number, _ in frames]
    )
    pixels = np.stack([plane for *_, plane in frames]).astype(np.uint8)
    seg.PixelData = pixels.tobytes() if fractional else pack_bits(pixels, pad=True)
    seg.ReferencedSeriesSequence = DicomSequence(_referenced_series([image for image, _, _ in references]))
    return seg


def _equipment(seg: Dataset, algorithm: Algorithm) -> None:
    seg.Manufacturer = MANUFACTURER
    seg.ManufacturerModelName = "edgescope runtime"
    seg.DeviceSerialNumber = "1"
    seg.SoftwareVersions = __version__
    # IHE AIR: the equipment that made the result, with what exactly ran (the bundle's digest and signer).
    contributor = Dataset()
    contributor.Manufacturer = MANUFACTURER
    contributor.ManufacturerModelName = f"{algorithm.name} {algorithm.version}"[:64]
    contributor.SoftwareVersions = [__version__, f"sha256:{algorithm.bundle_sha256}"[:64]]
    contributor.ContributionDescription = (
        f"model bundle sha256 {algorithm.bundle_sha256}, signed by {algorithm.signer or 'nobody'}"
    )[:1024]
    contributor.ContributionDateTime = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    contributor.PurposeOfReferenceCodeSequence = DicomSequence([Code("109102", "DCM", "Processing Equipment").item()])
    seg.ContributingEquipmentSequence = DicomSequence([contributor])


def _segment(segment: Segment, algorithm: Algorithm) -> Dataset:
    item = Dataset()
    item.SegmentNumber = segment.number
    item.SegmentLabel = segment.label[:64]
    item.SegmentAlgorithmType = "AUTOMATIC"
    item.SegmentAlgorithmName = algorithm.name[:64]
    item.SegmentedPropertyCategoryCodeSequence = DicomSequence([segment.category.item()])
    item.SegmentedPropertyTypeCodeSequence = DicomSequence([segment.type.item()])
    identification = Dataset()
    identification.AlgorithmFamilyCodeSequence = DicomSequence(
        [Code("123109", "DCM", "Artificial Intelligence").item()]
    )
    identification.AlgorithmName = algorithm.name[:64]
    identification.AlgorithmVersion = algorithm.version[:64]
    item.SegmentationAlgorithmIdentificationSequence = DicomSequence([identification])
    return item


def _dimensions(seg: Dataset, organization: str) -> None:
    """Without a frame of reference, the frames' one dimension is the segment (A.51.5.1)."""
    dimension = Dataset()
    dimension.DimensionOrganizationUID = organization
    seg.DimensionOrganizationSequence = DicomSequence([dimension])
    segment_index = Dataset()
    segment_index.DimensionOrganizationUID = organization
    segment_index.DimensionIndexPointer = 0x0062000B  # Referenced Segment Number
    segment_index.FunctionalGroupPointer = 0x0062000A  # Segment Identification Sequence
    segment_index.DimensionDescriptionLabel = "Segment Number"
    seg.DimensionIndexSequence = DicomSequence([segment_index])


def _frame_groups(source: Dataset, segment_number: int, frame_number: int | None) -> Dataset:
    source_image = Dataset()
    source_image.ReferencedSOPClassUID = source.SOPClassUID
    source_image.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        source_image.ReferencedFrameNumber = frame_number
    # Same rows and columns, pixel for pixel: a viewer may lay the mask over the frame as it is.
    source_image.SpatialLocationsPreserved = "YES"
    source_image.PurposeOfReferenceCodeSequence = DicomSequence(
        [Code("121322", "DCM", "Source image for image processing operation").item()]
    )
    derivation = Dataset()
    derivation.SourceImageSequence = DicomSequence([source_image])
    derivation.DerivationCodeSequence = DicomSequence([Code("113076", "DCM", "Segmentation").item()])
    content = Dataset()
    content.DimensionIndexValues = [segment_number]
    identification = Dataset()
    identification.ReferencedSegmentNumber = segment_number
    groups = Dataset()
    groups.DerivationImageSequence = DicomSequence([derivation])
    groups.FrameContentSequence = DicomSequence([content])
    groups.SegmentIdentificationSequence = DicomSequence([identification])
    return groups


def _referenced_series(sources: Sequence[Dataset]) -> list[Dataset]:
    """Each series the sources are in, with its instances, each once."""
    by_series: dict[str, dict[str, Dataset]] = {}
    for source in sources:
        instance = Dataset()
        instance.ReferencedSOPClassUID = source.SOPClassUID
        instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
        by_series.setdefault(str(source.SeriesInstanceUID), {})[str(source.SOPInstanceUID)] = instance
    items = []
    for series_uid, instances in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedInstanceSequence = DicomSequence(list(instances.values()))
        items.append(series)
    return items
