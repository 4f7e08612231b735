"""The patient and study that key images of a source that is not DICOM belong to (``--study-context FILE``).

A video, a camera or a network stream carries no patient, so the study its
key images and results are filed in is given in a small JSON or TOML file
(one table, keys as below), checked before anything is streamed:

- ``patient_id`` (required), ``patient_name`` (``Family^Given``),
  ``patient_birth_date`` (``YYYYMMDD``), ``patient_sex`` (``M``, ``F`` or ``O``);
- ``study_instance_uid`` (required), ``accession_number``, ``study_id``,
  ``study_date`` (``YYYYMMDD``), ``study_time`` (``HHMMSS``),
  ``referring_physician_name``;
- ``uid_root`` (optional): the organisation's UID root, under which the new
  series and instance UIDs are made (pydicom's root otherwise).

Errors name the field and the rule, never the value: the values identify a patient.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from pydicom.uid import generate_uid

from edgescope.config import read_table
from edgescope.errors import ConfigError

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX = 64
_TIME = re.compile(r"^(([01][0-9]|2[0-3])[0-5][0-9][0-5][0-9](\.[0-9]{1,6})?)?$")
# A root leaves at least 23 random digits in each UID made under it (PS3.5 B.2: at most 64 characters).
UID_ROOT_MAX = 40
# Value lengths of the attributes' VRs (PS3.5 6.2): LO 64, SH 16, PN 64 per component group.
_MAX_LENGTH = {
    "patient_id": 64,
    "patient_name": 64,
    "accession_number": 16,
    "study_id": 16,
    "referring_physician_name": 64,
}


@dataclass(frozen=True, slots=True)
class StudyContext:
    """The patient and the study, as their DICOM attributes will hold them (empty: not known)."""

    patient_id: str
    study_instance_uid: str
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    referring_physician_name: str = ""
    uid_root: str = ""

    def new_uid(self) -> str:
        """A new series or instance UID, under ``uid_root`` when there is one."""
        return str(generate_uid(prefix=f"{self.uid_root}." if self.uid_root else None))


def check_uid(field: str, value: str) -> None:
    """A DICOM UID: digits in dot-separated components without leading zeros, at most 64 characters."""
    if not value:
        raise ConfigError(f"study context: {field} is missing")
    if len(value) > UID_MAX or not UID_PATTERN.match(value):
        raise ConfigError(
            f"study context: {field} is not a DICOM UID (digits in components separated by dots, "
            f"no leading zeros, at most {UID_MAX} characters)"
        )


def parse_study_context(data: Mapping[str, object], origin: str) -> StudyContext:
    """Check every field of ``data`` (see the module docstring); raises ConfigError naming the first wrong one."""
    known = {f.name for f in fields(StudyContext)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"study context {origin}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values: dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"study context {origin}: {name} must be text (in quotes)")
        values[name] = value.strip()
    if not values.get("patient_id"):
        raise ConfigError(f"study context {origin}: patient_id is missing")
    check_uid("study_instance_uid", values.get("study_instance_uid", ""))
    if values.get("uid_root"):
        check_uid("uid_root", values["uid_root"])
        if len(values["uid_root"]) > UID_ROOT_MAX:
            raise ConfigError(f"study context {origin}: uid_root is longer than {UID_ROOT_MAX} characters")
    for name, limit in _MAX_LENGTH.items():
        value = values.get(name, "")
        if len(value) > limit or "\\" in value or any(not c.isprintable() for c in value):
            raise ConfigError(
                f"study context {origin}: {name} must be at most {limit} printable characters, without backslashes"
            )
    for name in ("patient_birth_date", "study_date"):
        _check_format(values.get(name, ""), "%Y%m%d", f"study context {origin}: {name} must be a date YYYYMMDD")
    if not _TIME.match(values.get("study_time", "")):
        raise ConfigError(f"study context {origin}: study_time must be a time HHMMSS")
    if values.get("patient_sex", "") not in ("", "M", "F", "O"):
        raise ConfigError(f"study context {origin}: patient_sex must be M, F or O")
    return StudyContext(**values)


def load_study_context(path: Path) -> StudyContext:
    """The study context in ``path`` (``.json`` or ``.toml``), checked."""
    return parse_study_context(read_table(path, "study context", "fields", (".json", ".toml")), str(path))


def _check_format(value: str, form: str, message: str) -> None:
    if not value:
        return
    try:
        datetime.strptime(value, form)
    except ValueError:
        raise ConfigError(message) from None
