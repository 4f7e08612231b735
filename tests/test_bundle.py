from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import helper

from edgescope.bundle import MANIFEST_FILE, load_bundle, manifest_to_json, staged_bundle, write_manifest
from edgescope.errors import BundleError
from edgescope.v1 import manifest_pb2


def tiny_onnx() -> bytes:
    """A real one-node ONNX model (Identity), so bundle checks that parse the graph can."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph).SerializeToString()


def _write(dest: Path) -> None:
    with staged_bundle(dest, overwrite=False) as staging:
        (staging / "model.onnx").write_bytes(tiny_onnx())
        (staging / "engines").mkdir()
        (staging / "engines" / "a.plan").write_bytes(b"plan")
        write_manifest(staging, manifest_pb2.ModelManifest(schema_version=1, name="m"))


def test_manifest_lists_every_file_with_its_sha256(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    assert [e.path for e in bundle.manifest.files] == ["engines/a.plan", "model.onnx"]
    import hashlib

    assert bundle.onnx_sha256 == hashlib.sha256(tiny_onnx()).hexdigest()


def test_altered_file_is_detected(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="altered"):
        load_bundle(tmp_path / "b")


def test_missing_file_is_detected(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    (tmp_path / "b" / "engines" / "a.plan").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "b")


def test_failure_while_staging_leaves_nothing(tmp_path: Path) -> None:
    def half_written() -> None:
        with staged_bundle(tmp_path / "b", overwrite=False) as staging:
            (staging / "model.onnx").write_bytes(b"half")
            raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        half_written()
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_kept_unless_overwrite(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"):
        _write(tmp_path / "b")
    with staged_bundle(tmp_path / "b", overwrite=True) as staging:
        write_manifest(staging, manifest_pb2.ModelManifest(schema_version=1, name="second"))
    assert load_bundle(tmp_path / "b").manifest.name == "second"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not a valid"),
        (manifest_to_json(manifest_pb2.ModelManifest(schema_version=7)), "schema version 7"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(BundleError, match=reason):
        load_bundle(tmp_path)


def test_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(tmp_path)
