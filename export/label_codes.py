"""``edgescope export --label-codes FILE``: how each label is coded in DICOM: a Segmentation's segments
(Segmented Property Category and Type), or a classifier's or a detector's findings in a Measurement
Report (Finding Category and the finding's type).

The file (``.json`` or ``.toml``) maps each label (after the background, for a segmentation model) to
its category and type, each ``[code value, coding scheme designator, code meaning]``::

    [lesion]
    category = ["49755003", "SCT", "Morphologically Altered Structure"]
    type = ["52988006", "SCT", "Lesion"]

Checked at export, before anything is run: every label in the file is one of the model's, every label
(after the background) has its codes, and each part fits its DICOM element (code value and scheme: SH,
at most 16 characters; meaning: LO, at most 64; none empty, none with a backslash or a control
character). The codes go into the manifest (``label_codes``), which the bundle's signature covers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgescope.config import read_table
from edgescope.errors import ConfigError
from edgescope.v1 import manifest_pb2

# (part, its DICOM element's value representation's length limit)
_PARTS = (("code value", 16), ("coding scheme designator", 16), ("code meaning", 64))


def load_label_codes(path: Path, labels: Sequence[str], *, background: bool = True) -> list[manifest_pb2.LabelCode]:
    """The label codes in ``path`` (``.json`` or ``.toml``) for a model with ``labels``, checked; ``background``:
    the first label is the background (a segmentation model's), which has none."""
    table = read_table(path, "label codes", "labels", (".json", ".toml"))
    return parse_label_codes(table, labels, str(path), background=background)


def parse_label_codes(
    data: dict[str, object], labels: Sequence[str], where: str, *, background: bool = True
) -> list[manifest_pb2.LabelCode]:
    """``data`` (label -> {category: [value, scheme, meaning], type: [...]}) checked against ``labels``."""
    if not labels:
        raise ConfigError(f"label codes {where}: the model has no labels to code")
    segments = list(labels[1:]) if background else list(labels)
    for label in data:
        if background and label == labels[0]:
            raise ConfigError(
                f"label codes {where}: label {label!r} is the background (the first label): it has no segment to code"
            )
        if label not in segments:
            raise ConfigError(
                f"label codes {where}: label {label!r} is not one of the model's labels ({', '.join(labels)})"
            )
    missing = [label for label in segments if label not in data]
    if missing:
        raise ConfigError(
            f"label codes {where}: label {missing[0]!r} has no codes "
            f"(every label{' after the background' if background else ''} needs them)"
        )
    codes = []
    for label in segments:
        entry = data[label]
        if not isinstance(entry, dict) or set(entry) != {"category", "type"}:
            raise ConfigError(
                f"label codes {where}: label {label!r} needs exactly a category and a type, "
                "each [code value, coding scheme designator, code meaning]"
            )
        codes.append(
            manifest_pb2.LabelCode(
                label=label,
                category=_concept(entry["category"], label, "category", where),
                type=_concept(entry["type"], label, "type", where),
            )
        )
    return codes


def _concept(value: object, label: str, which: str, where: str) -> manifest_pb2.CodedConcept:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(part, str) for part in value):
        raise ConfigError(
            f"label codes {where}: label {label!r}: its {which} must be three strings "
            '[code value, coding scheme designator, code meaning], e.g. ["52988006", "SCT", "Lesion"]'
        )
    for text, (part, limit) in zip(value, _PARTS, strict=True):
        if not text.strip():
            raise ConfigError(f"label codes {where}: label {label!r}: its {which}'s {part} is empty")
        if len(text) > limit:
            raise ConfigError(
                f"label codes {where}: label {label!r}: its {which}'s {part} {text!r} is {len(text)} characters; "
                f"DICOM allows at most {limit}"
            )
        if "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise ConfigError(
                f"label codes {where}: label {label!r}: its {which}'s {part} {text!r} holds a backslash or a "
                "control character, which DICOM does not allow there"
            )
    return manifest_pb2.CodedConcept(value=value[0], scheme=value[1], meaning=value[2])
