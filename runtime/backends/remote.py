"""Remote backend: forward inference to a Triton / KServe v2 server over gRPC.

For sites that outgrow one device: the edge server keeps decoding,
preprocessing, postprocessing and provenance, and a bigger inference server
runs the model. Loading checks that the remote model is ready and has the
inputs and outputs the bundle's manifest declares (names, datatypes, shapes),
and pins the version it found (or the one asked for): every request names
that version, so frames never go to a different model, or to another version
of it, by mistake. Like any backend, the session then runs the bundle's
golden frames before it serves. tritonclient is imported only when this
backend is built.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from edgescope.bundle import Bundle
from edgescope.errors import BackendError, MissingDependencyError
from edgescope.kserve.datatypes import tensor_datatype, tensor_shape
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities, dynamic_batch
from edgescope.v1 import manifest_pb2

_INSTALL_HINT = "install it with `pip install 'edgescope[remote]'` (or `pip install tritonclient`)"


def _tritonclient() -> tuple[ModuleType, type[Exception]]:
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise MissingDependencyError("tritonclient (for the remote backend)", _INSTALL_HINT) from exc
    return grpcclient, InferenceServerException


class RemoteSession(Session):
    backend_name = "remote"

    def __init__(
        self,
        manifest: manifest_pb2.ModelManifest,
        client: Any,
        remote_model: str,
        remote_version: str,
        url: str,
        timeout_s: float,
    ) -> None:
        super().__init__(manifest)
        self._grpcclient, self._error = _tritonclient()
        self._client = client
        self._remote_model = remote_model
        self._remote_version = remote_version
        self._url = url
        self._timeout_s = timeout_s
        self._output_names = [o.name for o in manifest.outputs]

    @property
    def capabilities(self) -> SessionCapabilities:
        # tritonclient's gRPC client is thread-safe: instances share it and wait on the network together.
        return SessionCapabilities(
            dynamic_batch=dynamic_batch(self.manifest),
            device_buffers=False,
            device=f"remote:{self._url}/{self._remote_model}/{self._remote_version or 'unversioned'}",
            max_concurrency=None,
        )

    def _infer_impl(self, feed: Feed) -> Outputs:
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in feed.items():
            tensor = self._grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(tensor)
        outputs = [self._grpcclient.InferRequestedOutput(name) for name in self._output_names]
        try:
            result = self._client.infer(
                self._remote_model,
                inputs,
                model_version=self._remote_version,
                outputs=outputs,
                client_timeout=self._timeout_s,
            )
        except self._error as exc:
            raise BackendError(f"remote inference on {self._url} ({self._remote_model}) failed: {exc}") from exc
        return {name: np.asarray(result.as_numpy(name)) for name in self._output_names}

    def describe(self) -> manifest_pb2.RunnerInfo:
        return remote_info(self._url, self._remote_model, self._remote_version, self.manifest.precision)

    def _close_impl(self) -> None:
        self._client.close()


class RemoteBackend:
    """Sessions whose ``infer`` runs on a KServe v2 server at ``url`` (host:port)."""

    name = "remote"
    # Remote calls wait on the network: several in flight keep the remote server busy.
    default_instances = 4

    def __init__(
        self, url: str, *, model_name: str | None = None, model_version: str = "", timeout_s: float = 10.0
    ) -> None:
        self._grpcclient, self._error = _tritonclient()
        self.url = url
        self.model_name = model_name
        # Empty: pin the newest version the server reports at load.
        self.model_version = model_version
        self.timeout_s = timeout_s

    def load(self, bundle: Bundle) -> RemoteSession:
        remote_model = self.model_name or bundle.manifest.name
        client = self._grpcclient.InferenceServerClient(self.url)
        try:
            version = self._check_model(client, remote_model, bundle.manifest)
        except BaseException:
            client.close()
            raise
        return RemoteSession(bundle.manifest, client, remote_model, version, self.url, self.timeout_s)

    def _check_model(self, client: Any, remote_model: str, manifest: manifest_pb2.ModelManifest) -> str:
        """The version to pin, once the remote model proves to be the bundle's (same tensors)."""
        try:
            ready = client.is_model_ready(remote_model, self.model_version, client_timeout=self.timeout_s)
            metadata = (
                client.get_model_metadata(remote_model, self.model_version, client_timeout=self.timeout_s)
                if ready
                else None
            )
        except self._error as exc:
            raise BackendError(f"cannot reach the inference server at {self.url}: {exc}") from exc
        wanted = f"{remote_model!r}" + (f" version {self.model_version!r}" if self.model_version else "")
        if metadata is None:
            raise BackendError(f"model {wanted} is not ready on {self.url}")
        for role, remote, local in (
            ("inputs", metadata.inputs, manifest.inputs),
            ("outputs", metadata.outputs, manifest.outputs),
        ):
            theirs = {t.name: (t.datatype, list(t.shape)) for t in remote}
            ours = {spec.name: (tensor_datatype(spec), tensor_shape(spec)) for spec in local}
            if theirs != ours:
                raise BackendError(
                    f"model {wanted} on {self.url} has {role} {_describe(theirs)}; the bundle "
                    f"{manifest.name!r} declares {_describe(ours)}: not the same model"
                )
        if self.model_version:
            return self.model_version
        versions = list(metadata.versions)
        # Integer versions (Triton's) compare as numbers; the newest is what the server serves by default.
        return max(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v)) if versions else ""


def _describe(tensors: dict[str, tuple[str, list[int]]]) -> str:
    return ", ".join(f"{name} {datatype} {shape}" for name, (datatype, shape) in sorted(tensors.items())) or "none"


def remote_info(
    url: str, model: str, version: str, precision: manifest_pb2.Precision.ValueType
) -> manifest_pb2.RunnerInfo:
    """A Triton/KServe v2 server's model: what its ``infer`` is, for reports and provenance."""
    return manifest_pb2.RunnerInfo(
        kind="remote",
        device=f"remote:{url}",
        precision=precision,
        detail=f"model {model} version {version or 'latest'}",
    )
