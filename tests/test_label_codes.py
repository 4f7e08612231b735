"""``edgescope export --label-codes``: each label's DICOM codes, signed in the manifest, in the Segmentation."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from edgescope.bundle import MANIFEST_FILE, load_bundle
from edgescope.cli import main
from edgescope.errors import BundleError, ConfigError
from edgescope.export.api import ExportRequest, build_manifest
from edgescope.runtime.archive.recorders import CineRecorder, algorithm_of
from edgescope.runtime.archive.seg import Code, segmentation, segments_for
from edgescope.runtime.client.archive import bundle_label_codes
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.server.repository import BundlePolicy
from edgescope.runtime.sources import open_source
from edgescope.signing import generate_key, load_public_keys

from .conftest import EXAMPLE, ServerThread

CINE = get_testdata_file("color3d_jpeg_baseline.dcm")
LABELS = ["background", "lesion"]
CODES = {
    "lesion": {"category": ["49755003", "SCT", "Morphologically Altered Structure"], "type": ["4147007", "SCT", "Mass"]}
}


def _manifest_with(tmp_path: Path, codes: object, suffix: str = ".json", task: str = "segmentation") -> None:
    path = tmp_path / f"codes{suffix}"
    path.write_text(json.dumps(codes) if suffix == ".json" else str(codes), encoding="utf-8")
    build_manifest(ExportRequest(name="m", output=tmp_path / "b", labels=LABELS, label_codes=path, task=task))


@pytest.mark.parametrize(
    ("codes", "reason"),
    [
        ({**CODES, "tumour": CODES["lesion"]}, "label 'tumour' is not one of the model's labels"),
        ({"background": CODES["lesion"], **CODES}, "label 'background' is the background"),
        ({}, "label 'lesion' has no codes"),
        ({"lesion": {"category": CODES["lesion"]["category"]}}, "label 'lesion' needs exactly a category and a type"),
        ({"lesion": {**CODES["lesion"], "type": ["4147007", "", "Mass"]}}, "label 'lesion': its type's coding scheme"),
        ({"lesion": {**CODES["lesion"], "type": ["4147007", "SCT"]}}, "label 'lesion': its type must be three"),
        ({"lesion": {**CODES["lesion"], "type": ["1" * 17, "SCT", "Mass"]}}, "17 characters; DICOM allows at most 16"),
        ({"lesion": {**CODES["lesion"], "type": ["4147007", "SCT", "M" * 65]}}, "at most 64"),
        ({"lesion": {**CODES["lesion"], "type": ["4147007", "SCT", "a\\b"]}}, "backslash"),
    ],
)
def test_bad_label_codes_fail_at_export_naming_the_label(tmp_path: Path, codes: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        _manifest_with(tmp_path, codes)


def test_label_codes_in_toml_and_only_for_tasks_that_code_their_labels(tmp_path: Path) -> None:
    toml = (
        '[lesion]\ncategory = ["49755003", "SCT", "Morphologically Altered Structure"]\n'
        'type = ["4147007", "SCT", "Mass"]\n'
    )
    path = tmp_path / "codes.toml"
    path.write_text(toml, encoding="utf-8")
    manifest = build_manifest(ExportRequest(name="m", output=tmp_path / "b", labels=LABELS, label_codes=path))
    assert [(c.label, c.type.value, c.type.scheme, c.type.meaning) for c in manifest.label_codes] == [
        ("lesion", "4147007", "SCT", "Mass")
    ]
    with pytest.raises(ConfigError, match="task image makes neither"):
        _manifest_with(tmp_path, CODES, task="image")
    # A classifier's or a detector's first label is a class like the others: it needs codes too.
    with pytest.raises(ConfigError, match=r"label 'background' has no codes \(every label needs them\)"):
        _manifest_with(tmp_path, CODES, task="classification")
    _manifest_with(tmp_path, {"background": CODES["lesion"], **CODES}, task="detection")
    with pytest.raises(ConfigError, match=r"name it \.json or \.toml"):
        _manifest_with(tmp_path, CODES, suffix=".yaml")


def test_without_codes_the_rule_holds_and_codes_win_where_given() -> None:
    mass = (Code("49755003", "SCT", "Morphologically Altered Structure"), Code("4147007", "SCT", "Mass"))
    assert segments_for(LABELS)[0].type.meaning == "Lesion"
    assert segments_for(LABELS, {"lesion": mass})[0].type == mass[1]


@pytest.fixture(scope="module")
def coded_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The example model exported by the CLI with --label-codes and --sign-key: (bundle, trusted public key)."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("coded")
    public = generate_key(folder / "release.key")
    (folder / "codes.json").write_text(json.dumps(CODES), encoding="utf-8")
    out = folder / "repo" / "lesion-unet"
    argv = ["export", "--name", "lesion-unet", "--out", str(out), "--factory", f"{EXAMPLE / 'model.py'}:build"]
    argv += ["--weights", str(EXAMPLE / "weights.pt"), "--samples", "4", "--golden-frames", "2"]
    argv += ["--label-codes", str(folder / "codes.json"), "--sign-key", str(folder / "release.key")]
    assert main(argv) == 0
    return out, public


def test_an_exported_bundle_carries_its_label_codes_signed(coded_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, public = coded_bundle
    policy = BundlePolicy(trusted_keys=tuple(load_public_keys(public)))
    opened = policy.open(bundle)
    assert opened.signer
    (code,) = opened.manifest.label_codes
    assert (code.label, code.type.value, code.type.meaning) == ("lesion", "4147007", "Mass")
    # The codes are part of what is signed: changing one is refused like any altered file.
    copy = tmp_path / "lesion-unet"
    shutil.copytree(bundle, copy)
    manifest = copy / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"Mass"', '"Cyst"', 1))
    with pytest.raises(BundleError, match="does not verify"):
        policy.open(copy)


@pytest.fixture(scope="module")
def coded_server(coded_bundle: tuple[Path, Path]) -> Iterator[ServerThread]:
    running = ServerThread([coded_bundle[0]])
    try:
        yield running
    finally:
        running.stop()


def test_the_segmentation_carries_the_bundles_codes_and_is_valid(
    coded_server: ServerThread, coded_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    highdicom = pytest.importorskip("highdicom")
    recorder = CineRecorder(Path(CINE))
    with open_source(f"dicom:{CINE}") as source:
        options = StreamOptions(target=coded_server.target, model="", realtime=False, max_frames=4)
        asyncio.run(stream_source(source, options, recorder.observe))
    kept = recorder.kept
    assert kept.masks
    # What the recorder asks the server for when it writes: the codes of the bundle the results came from.
    codes, said = bundle_label_codes(coded_server.target, None, kept.provenance)
    assert said == "bundle" and codes["lesion"][1] == Code("4147007", "SCT", "Mass")
    # Without a server to ask: the rule, said so.
    assert bundle_label_codes("", None, kept.provenance)[1].startswith("default rule")
    source = pydicom.dcmread(CINE, stop_before_pixels=True)
    seg = segmentation(source, kept.masks, segments_for(kept.labels, codes), algorithm_of(kept.provenance))
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    read = highdicom.seg.segread(path)
    description = read.get_segment_description(1)
    assert (description.segmented_property_type.value, description.segmented_property_type.meaning) == (
        "4147007",
        "Mass",
    )
    assert description.segmented_property_category.meaning == "Morphologically Altered Structure"
    assert load_bundle(coded_bundle[0]).manifest.label_codes[0].category.value == "49755003"
    if shutil.which("dciodvfy") is not None:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []
