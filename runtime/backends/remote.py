"""Remote backend: forward inference to a Triton / KServe v2 server over gRPC.

For sites that outgrow one device: the edge server keeps decoding,
preprocessing, postprocessing and provenance, and a bigger inference server
runs the model. Loading checks that the remote model is ready and takes the
inputs the bundle's manifest declares, so frames are never sent to a
different model by mistake. tritonclient is imported only when this backend
is built.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from edgescope.bundle import Bundle
from edgescope.errors import BackendError, MissingDependencyError
from edgescope.runtime.backends.base import Feed, Outputs, Session, SessionCapabilities
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
        url: str,
        timeout_s: float,
    ) -> None:
        super().__init__(manifest)
        self._grpcclient, self._error = _tritonclient()
        self._client = client
        self._remote_model = remote_model
        self._url = url
        self._timeout_s = timeout_s
        self._output_names = [o.name for o in manifest.outputs]

    @property
    def capabilities(self) -> SessionCapabilities:
        first = self.manifest.inputs[0].shape[0] if self.manifest.inputs else None
        dynamic = first is not None and first.WhichOneof("kind") == "symbol"
        # tritonclient's gRPC client is thread-safe: instances share it and wait on the network together.
        return SessionCapabilities(
            dynamic_batch=dynamic, device_buffers=False, device=f"remote:{self._url}", max_concurrency=None
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
            result = self._client.infer(self._remote_model, inputs, outputs=outputs, client_timeout=self._timeout_s)
        except self._error as exc:
            raise BackendError(f"remote inference on {self._url} ({self._remote_model}) failed: {exc}") from exc
        return {name: np.asarray(result.as_numpy(name)) for name in self._output_names}

    def _close_impl(self) -> None:
        self._client.close()


class RemoteBackend:
    """Sessions whose ``infer`` runs on a KServe v2 server at ``url`` (host:port)."""

    name = "remote"
    # Remote calls wait on the network: several in flight keep the remote server busy.
    default_instances = 4

    def __init__(self, url: str, *, model_name: str | None = None, timeout_s: float = 10.0) -> None:
        self._grpcclient, self._error = _tritonclient()
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s

    def load(self, bundle: Bundle) -> RemoteSession:
        remote_model = self.model_name or bundle.manifest.name
        client = self._grpcclient.InferenceServerClient(self.url)
        try:
            self._check_model(client, remote_model, bundle.manifest)
        except BaseException:
            client.close()
            raise
        return RemoteSession(bundle.manifest, client, remote_model, self.url, self.timeout_s)

    def _check_model(self, client: Any, remote_model: str, manifest: manifest_pb2.ModelManifest) -> None:
        try:
            ready = client.is_model_ready(remote_model, client_timeout=self.timeout_s)
            metadata = client.get_model_metadata(remote_model, client_timeout=self.timeout_s) if ready else None
        except self._error as exc:
            raise BackendError(f"cannot reach the inference server at {self.url}: {exc}") from exc
        if metadata is None:
            raise BackendError(f"model {remote_model!r} is not ready on {self.url}")
        remote_inputs = sorted(t.name for t in metadata.inputs)
        local_inputs = sorted(spec.name for spec in manifest.inputs)
        if remote_inputs != local_inputs:
            raise BackendError(
                f"model {remote_model!r} on {self.url} takes inputs {remote_inputs}; "
                f"the bundle {manifest.name!r} declares {local_inputs}: not the same model"
            )
