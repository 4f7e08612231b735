"""Key frames of a source that is not DICOM -> Secondary Capture images (highdicom) in a given study.

One single-frame SC image per key frame, all in one series, filed in the
patient's study that the study context names (``archive.study``). The pixels
are the frame as it was streamed (8-bit gray or RGB, or 16-bit gray),
uncompressed. Pixel Spacing is written only where the source knew it (a
calibrated probe): a camera's frame has no physical pixel size, and none is
made up. The Modality is the source's (US, ES, RF, GM; OT otherwise), as a
Secondary Capture of another modality's images says. Each image's content
date and time are when its frame was captured, and its Image Comments say
why it was kept (the key frame policy) and where it lies in the stream.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
import numpy.typing as npt

from edgescope import __version__
from edgescope.errors import FrameError
from edgescope.runtime.archive.seg import MANUFACTURER
from edgescope.runtime.archive.study import StudyContext

# The modality of the images a Secondary Capture was taken from (PS3.3 C.7.3.1.1.1), by source kind.
MODALITY = {"ultrasound": "US", "endoscopy": "ES", "fluoroscopy": "RF", "microscope": "GM"}


@dataclass(frozen=True, slots=True)
class KeyFrame:
    """A frame kept for the archive: its pixels, when it was captured, its pixel spacing if known, and why."""

    index: int
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
    captured: datetime
    stream_time_s: float
    spacing_mm: tuple[float, float] | None
    reason: str


def key_images(
    frames: Sequence[KeyFrame], study: StudyContext, source_kind: str, *, series_number: int = 902
) -> list[hd.sc.SCImage]:
    """One Secondary Capture image per key frame, in one new series of ``study``."""
    series_uid = study.new_uid()
    return [
        _image(frame, number, study, series_uid, source_kind, series_number) for number, frame in enumerate(frames, 1)
    ]


def _image(
    frame: KeyFrame, number: int, study: StudyContext, series_uid: str, source_kind: str, series_number: int
) -> hd.sc.SCImage:
    pixels = frame.pixels
    if pixels.ndim == 2:
        photometric = "MONOCHROME2"
    elif pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8:
        photometric = "RGB"
    else:
        raise FrameError(f"key frame {frame.index}: {pixels.shape} {pixels.dtype} is neither gray nor 8-bit RGB")
    with warnings.catch_warnings():
        # The patient's name is the study context's, kept as given: highdicom's advice on its form is not ours to take.
        warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
        image = hd.sc.SCImage(
            pixel_array=np.ascontiguousarray(pixels),
            photometric_interpretation=photometric,
            bits_allocated=pixels.dtype.itemsize * 8,
            # Required by highdicom for images that are not of a slide; the orientation itself is unknown (below).
            coordinate_system="PATIENT",
            patient_orientation=("L", "F"),
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=study.new_uid(),
            instance_number=number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="edgescope runtime",
            software_versions=__version__,
            patient_id=study.patient_id,
            patient_name=study.patient_name or None,
            patient_birth_date=study.patient_birth_date or None,
            patient_sex=study.patient_sex or None,
            accession_number=study.accession_number or None,
            study_id=study.study_id or None,
            study_date=study.study_date or None,
            study_time=study.study_time or None,
            referring_physician_name=study.referring_physician_name or None,
            pixel_spacing=frame.spacing_mm,
            series_description="edgescope key frames",
            content_date=frame.captured.date(),
            content_time=frame.captured.time(),
            # UTF-8: a name written in any script is kept as it is.
            specific_character_set="ISO_IR 192",
        )
    # A camera's frame has no known orientation to the patient, nor side: empty (type 2C) rather than a guess.
    image.PatientOrientation = []
    image.Laterality = ""
    image.Modality = MODALITY.get(source_kind, "OT")
    image.ImageComments = (
        f"key frame ({frame.reason}) at {frame.stream_time_s:.3f} s of the stream, frame {frame.index}"
    )
    return image
