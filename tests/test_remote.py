"""The remote backend, against our own server's KServe v2 endpoint on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from edgescope.bundle import MANIFEST_FILE, Bundle, load_bundle
from edgescope.errors import BackendError
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.pipeline.encode import decode_mask
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.v1 import stream_pb2

from .conftest import ServerThread

pytest.importorskip("tritonclient.grpc")


def _masks(target: str) -> tuple[list[np.ndarray], list[stream_pb2.Result]]:
    results: list[stream_pb2.Result] = []
    options = StreamOptions(target=target, model="lesion-unet", realtime=False, timeout_s=60)
    asyncio.run(stream_source(SyntheticUltrasoundSource(seed=4, n_frames=6), options, lambda _f, r: results.append(r)))
    return [decode_mask(r.outputs[0].mask) for r in results], results


def test_a_server_on_the_remote_backend_gives_the_same_results(server: ServerThread, example_bundle: Bundle) -> None:
    from edgescope.runtime.backends.remote import RemoteBackend

    front = ServerThread([example_bundle.path], backend=RemoteBackend(server.target, timeout_s=30))
    try:
        remote_masks, remote_results = _masks(front.target)
    finally:
        front.stop()
    local_masks, _ = _masks(server.target)
    assert len(remote_masks) == 6
    for remote, local in zip(remote_masks, local_masks, strict=True):
        np.testing.assert_array_equal(remote, local)
    assert all(r.provenance.backend == "remote" for r in remote_results)
    # Provenance names the remote model and the version pinned at load (the bundle's, as our server serves it).
    version = example_bundle.manifest.version
    assert all(r.provenance.device == f"remote:{server.target}/lesion-unet/{version}" for r in remote_results)


def test_loading_refuses_a_missing_or_different_remote_model(server: ServerThread, example_bundle: Bundle) -> None:
    from edgescope.runtime.backends.remote import RemoteBackend

    with pytest.raises(BackendError, match="not ready"):
        RemoteBackend(server.target, model_name="no-such-model", timeout_s=10).load(example_bundle)
    with pytest.raises(BackendError, match="not ready"):
        RemoteBackend(server.target, model_version="7", timeout_s=10).load(example_bundle)
    unused_port = f"127.0.0.1:{_free_port()}"
    with pytest.raises(BackendError, match="cannot reach"):
        RemoteBackend(unused_port, timeout_s=2).load(example_bundle)


def test_loading_refuses_a_remote_model_with_other_tensors(
    server: ServerThread, example_bundle: Bundle, tmp_path: Path
) -> None:
    from edgescope.runtime.backends.remote import RemoteBackend

    # The same graph, but a bundle that expects another output: the remote model is not this bundle's.
    copy = Path(shutil.copytree(example_bundle.path, tmp_path / "other"))
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["outputs"][0]["name"] = "probabilities"
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=r"outputs logits FP32 .*declares probabilities FP32.*not the same model"):
        RemoteBackend(server.target, model_name="lesion-unet", timeout_s=10).load(load_bundle(copy))


def _free_port() -> int:
    # Bind and release a port, so nothing listens there during the test.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_missing_tritonclient_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from edgescope.errors import MissingDependencyError
    from edgescope.runtime.backends.remote import RemoteBackend

    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(MissingDependencyError, match=r"tritonclient.*pip install"):
        RemoteBackend("127.0.0.1:1")
