"""Signed bundles, strict bundle contents and the model repository, down to the server's answers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper, numpy_helper

from edgescope.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle, load_bundle, write_manifest
from edgescope.cli import main
from edgescope.errors import BundleError, ConfigError, ModelNotFoundError
from edgescope.runtime.pipeline.decode import encode_raw
from edgescope.runtime.server.repository import BundlePolicy, ModelRepository
from edgescope.runtime.server.security import SecurityConfig
from edgescope.signing import fingerprint, generate_key, load_private_key, load_public_keys, sign_bundle
from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

from .conftest import ServerThread


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    trusted_pub = generate_key(folder / "release.key")
    stranger_pub = generate_key(folder / "stranger.key")
    return {
        "key": folder / "release.key",
        "pub": trusted_pub,
        "stranger": folder / "stranger.key",
        "stranger_pub": stranger_pub,
    }


@pytest.fixture
def copy(example_bundle: Bundle, tmp_path: Path) -> Path:
    """A fresh copy of the example bundle inside a model repository of its own."""
    destination = tmp_path / "repo" / "lesion-unet"
    shutil.copytree(example_bundle.path, destination)
    return destination


def _policy(keys: dict[str, Path]) -> BundlePolicy:
    return BundlePolicy(trusted_keys=tuple(load_public_keys(keys["pub"])))


def test_signed_bundle_verifies_and_names_its_signer(copy: Path, keys: dict[str, Path]) -> None:
    signer = sign_bundle(copy, load_private_key(keys["key"]))
    bundle = _policy(keys).open(copy)
    assert bundle.signer == signer == fingerprint(load_public_keys(keys["pub"])[0])
    # Without trusted keys nothing is claimed: the signature is not checked.
    assert load_bundle(copy).signer == ""


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("unsigned", "not signed"),
        ("wrong key", "not among this server's trusted keys"),
        ("manifest changed", "does not verify"),
        ("manifest re-hashed", "does not verify"),
        ("forged key name", "does not verify"),
        ("signature garbage", "not a valid signature document"),
        ("signature is a link", "not signed"),
    ],
)
def test_signature_refusals(copy: Path, keys: dict[str, Path], tamper: str, reason: str) -> None:
    sign_bundle(copy, load_private_key(keys["stranger" if tamper in ("wrong key", "forged key name") else "key"]))
    signature = copy / SIGNATURE_FILE
    manifest = copy / MANIFEST_FILE
    original_signature = signature.read_text()
    if tamper == "unsigned":
        signature.unlink()
    elif tamper == "manifest changed":
        manifest.write_text(manifest.read_text().replace('"lesion-unet"', '"lesion-unet-x"', 1))
    elif tamper == "manifest re-hashed":
        # An attacker swaps the model and re-hashes it: the files match the manifest, the signature does not.
        (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\x00")
        write_manifest(copy, load_bundle(copy, verify=False).manifest)
        (copy / SIGNATURE_FILE).write_text(original_signature)
    elif tamper == "forged key name":
        document = json.loads(signature.read_text())
        document["key"] = fingerprint(load_public_keys(keys["pub"])[0])
        signature.write_text(json.dumps(document))
    elif tamper == "signature garbage":
        signature.write_text("{not json")
    elif tamper == "signature is a link":
        signature.unlink()
        outside = copy.parent / "elsewhere.sig"
        outside.write_text("{}")
        signature.symlink_to(outside)
    with pytest.raises(BundleError, match=reason):
        _policy(keys).open(copy)


def test_rewriting_the_manifest_drops_the_stale_signature(copy: Path, keys: dict[str, Path]) -> None:
    sign_bundle(copy, load_private_key(keys["key"]))
    write_manifest(copy, load_bundle(copy).manifest)
    assert not (copy / SIGNATURE_FILE).exists()


def _relist(bundle_dir: Path, edit: object) -> None:
    """Rewrite the manifest's file list through ``edit`` (a callable on the JSON dict), hashes untouched."""
    text = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    edit(text)  # type: ignore[operator]
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(text))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("extra file", "not listed in the manifest"),
        ("hidden extra file", "not listed in the manifest"),
        ("path escape", "does not name a file inside the bundle"),
        ("absolute path", "does not name a file inside the bundle"),
        ("listed twice", "twice"),
        ("file is a symlink out", "symbolic link"),
        ("folder is a symlink out", "symbolic link"),
        ("binary manifest", "not UTF-8"),
        ("manifest is a symlink", "symbolic link"),
        ("model swapped", "altered after export"),
    ],
)
def test_bundle_content_refusals(copy: Path, tmp_path: Path, damage: str, reason: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"patient list")
    if damage == "extra file":
        (copy / "payload.py").write_text("print('hi')")
    elif damage == "hidden extra file":
        (copy / ".extra").write_bytes(b"x")
    elif damage == "path escape":
        _relist(copy, lambda m: m["files"].append({"path": "../../outside/secret", "sha256": "0" * 64}))
    elif damage == "absolute path":
        _relist(copy, lambda m: m["files"].append({"path": str(outside / "secret"), "sha256": "0" * 64}))
    elif damage == "listed twice":
        _relist(copy, lambda m: m["files"].append(dict(m["files"][0])))
    elif damage == "file is a symlink out":
        (copy / "model.onnx").unlink()
        (copy / "model.onnx").symlink_to(outside / "secret")
    elif damage == "folder is a symlink out":
        (copy / "engines").symlink_to(outside, target_is_directory=True)
    elif damage == "binary manifest":
        (copy / MANIFEST_FILE).write_bytes(b"\xff\xfe\x00binary" * 10)
    elif damage == "manifest is a symlink":
        real = outside / "manifest.json"
        real.write_bytes((copy / MANIFEST_FILE).read_bytes())
        (copy / MANIFEST_FILE).unlink()
        (copy / MANIFEST_FILE).symlink_to(real)
    elif damage == "model swapped":
        (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError, match=reason):
        load_bundle(copy)


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    weights = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        initializer=[weights],
    )
    model = helper.make_model(graph)
    external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    bundle = tmp_path / "b"
    bundle.mkdir()
    onnx.save_model(model, bundle / "model.onnx")
    write_manifest(bundle, manifest_pb2.ModelManifest(schema_version=1, name="m"))
    assert (bundle / "weights.bin").exists()  # listed and hashed, but the graph would read it by path
    with pytest.raises(BundleError, match="external data"):
        load_bundle(bundle)


def test_bytes_loaded_are_the_bytes_checked(copy: Path) -> None:
    bundle = load_bundle(copy)
    (copy / "model.onnx").write_bytes(b"swapped after the check")
    with pytest.raises(BundleError, match="altered"):
        bundle.onnx_bytes()


def test_repository_resolves_names_only(copy: Path, tmp_path: Path) -> None:
    repository = ModelRepository(copy.parent)
    assert repository.resolve("lesion-unet") == copy.resolve()
    for name in ("../lesion-unet", "/etc", "a/b", "..", ".", ".hidden", "", "x" * 200, "name\0"):
        with pytest.raises(ConfigError):
            repository.resolve(name)
    with pytest.raises(ModelNotFoundError):
        repository.resolve("absent")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(copy, elsewhere)
    (copy.parent / "linked-out").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BundleError, match="leaves the model repository"):
        repository.resolve("linked-out")
    (copy.parent / "linked-in").symlink_to(copy, target_is_directory=True)
    assert repository.resolve("linked-in") == copy.resolve()
    with pytest.raises(BundleError, match="no model repository"):
        ModelRepository(None).resolve("lesion-unet")


def test_cli_keygen_sign_and_export_refusal(copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.key"
    assert main(["keygen", "--out", str(key)]) == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert main(["keygen", "--out", str(key)]) == 2  # never overwrites a key
    assert main(["sign", str(copy), "--key", str(key)]) == 0
    assert "signed" in capsys.readouterr().out
    assert _policy({"pub": Path(f"{key}.pub")}).open(copy).signer
    with pytest.raises(ConfigError, match="no PEM public key"):
        load_public_keys(key)  # a private key is not a trusted key


# -- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_repo(example_bundle: Bundle, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("signed-repo")
    shutil.copytree(example_bundle.path, repo / "signed")
    sign_bundle(repo / "signed", load_private_key(keys["key"]))
    shutil.copytree(example_bundle.path, repo / "unsigned")
    shutil.copytree(example_bundle.path, repo / "by-stranger")
    sign_bundle(repo / "by-stranger", load_private_key(keys["stranger"]))
    shutil.copytree(example_bundle.path, repo / "failed-gate")
    manifest = load_bundle(repo / "failed-gate").manifest
    manifest.validation.passed = False
    write_manifest(repo / "failed-gate", manifest)
    sign_bundle(repo / "failed-gate", load_private_key(keys["key"]))
    os.symlink(example_bundle.path, repo / "outside-link")
    return repo


@pytest.fixture(scope="module")
def signed_server(signed_repo: Path, keys: dict[str, Path]) -> Iterator[ServerThread]:
    security = SecurityConfig(model_repository=signed_repo, trusted_keys=keys["pub"])
    running = ServerThread([signed_repo / "signed"], security=security)
    try:
        yield running
    finally:
        running.stop()


def test_server_refuses_unsigned_bundles_at_start(example_bundle: Bundle, keys: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match="not signed"):
        ServerThread([example_bundle.path], security=SecurityConfig(trusted_keys=keys["pub"]))


@pytest.mark.parametrize(
    ("bundle", "code", "reason"),
    [
        ("unsigned", grpc.StatusCode.FAILED_PRECONDITION, "not signed"),
        ("by-stranger", grpc.StatusCode.FAILED_PRECONDITION, "not among"),
        ("failed-gate", grpc.StatusCode.FAILED_PRECONDITION, "--allow-failed-validation"),
        ("outside-link", grpc.StatusCode.FAILED_PRECONDITION, "leaves the model repository"),
        ("../signed", grpc.StatusCode.INVALID_ARGUMENT, "not a bundle name"),
        (str(Path("/etc")), grpc.StatusCode.INVALID_ARGUMENT, "not a bundle name"),
        ("absent", grpc.StatusCode.NOT_FOUND, "no bundle"),
    ],
)
def test_load_model_refusals(signed_server: ServerThread, bundle: str, code: grpc.StatusCode, reason: str) -> None:
    with grpc.insecure_channel(signed_server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            stub.LoadModel(stream_pb2.LoadModelRequest(bundle=bundle, name="x"), timeout=60)
    assert failure.value.code() == code
    assert reason in (failure.value.details() or "")


def test_signed_load_and_results_name_the_signer(signed_server: ServerThread, keys: dict[str, Path]) -> None:
    frame = stream_pb2.Frame(model="again", raw=encode_raw(np.full((64, 64), 80, dtype=np.uint8)))
    with grpc.insecure_channel(signed_server.target) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        stub.LoadModel(stream_pb2.LoadModelRequest(bundle="signed", name="again"), timeout=60)
        result = stub.Infer(frame, timeout=60)
        stub.UnloadModel(stream_pb2.UnloadModelRequest(name="again"), timeout=30)
    assert result.provenance.signer == fingerprint(load_public_keys(keys["pub"])[0])
    assert not result.provenance.failed_validation


def test_failed_gate_is_the_servers_choice_and_every_result_says_so(signed_repo: Path, keys: dict[str, Path]) -> None:
    assert "allow_failed_validation" not in stream_pb2.LoadModelRequest.DESCRIPTOR.fields_by_name
    security = SecurityConfig(model_repository=signed_repo, trusted_keys=keys["pub"])
    running = ServerThread([signed_repo / "failed-gate"], security=security, allow_failed_validation=True)
    try:
        frames = [
            stream_pb2.Frame(stream_id="f", seq=i, raw=encode_raw(np.full((64, 64), 80, dtype=np.uint8)))
            for i in range(3)
        ]
        with grpc.insecure_channel(running.target) as channel:
            results = list(stream_pb2_grpc.StreamServiceStub(channel).Stream(iter(frames), timeout=60))
    finally:
        running.stop()
    assert len(results) == 3
    assert all(r.status.code == stream_pb2.FRAME_STATUS_CODE_OK and r.provenance.failed_validation for r in results)
