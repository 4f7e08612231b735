"""The backend contract: ``load(bundle) -> Session``; ``session.infer(feed)``.

Sessions follow the runner shape: ``infer`` is public and timed, the
implementation lives in ``_infer_impl``; a session is a context manager so
device memory and threads are released deterministically.

A session declares how many callers it can take at once
(``capabilities.max_concurrency``). The server's model worker never calls it
beyond that: a session that holds per-call state (TensorRT: one execution
context, one CUDA stream, one set of buffers) declares 1 and gets one thread.
A session is closed by the thread that runs it, after its last call.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgescope.bundle import Bundle
from edgescope.errors import BackendError
from edgescope.v1 import manifest_pb2

Feed = Mapping[str, npt.NDArray[np.generic]]
Outputs = dict[str, npt.NDArray[np.generic]]


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class SessionCapabilities:
    """What a session can do, so the pipeline can adapt without probing."""

    dynamic_batch: bool
    device_buffers: bool
    device: str
    # Callers it can take at once; None: any number (a thread-safe client of a remote server).
    max_concurrency: int | None = 1
    # Rows one inference may take (a TensorRT engine's optimization profile); None: as many as sent.
    max_batch: int | None = None


class Session(ABC):
    """A loaded model ready to run; one per model per server."""

    backend_name: str

    def __init__(self, manifest: manifest_pb2.ModelManifest) -> None:
        self.manifest = manifest
        self.inference_time = 0.0
        self._closed = False

    @property
    @abstractmethod
    def capabilities(self) -> SessionCapabilities: ...

    def infer(self, feed: Feed) -> Outputs:
        """Run the model; ``inference_time`` holds the last call's seconds."""
        if self._closed:
            raise BackendError(f"{self.backend_name} session for {self.manifest.name} is closed")
        start = time.perf_counter()
        outputs = self._infer_impl(feed)
        self.inference_time = time.perf_counter() - start
        return outputs

    @abstractmethod
    def _infer_impl(self, feed: Feed) -> Outputs: ...

    def describe(self) -> manifest_pb2.RunnerInfo:
        """What computes this session's numbers (backend, device, precision, artifact), for reports and provenance."""
        return manifest_pb2.RunnerInfo(
            kind=self.backend_name, device=self.capabilities.device, precision=self.manifest.precision
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_impl()

    @abstractmethod
    def _close_impl(self) -> None:
        """Release backend resources (device memory, threads)."""

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Backend(Protocol):
    """Turns a bundle into a session.

    ``default_instances`` is how many instances of a model the server runs
    when not told (each instance is one session state and one thread).
    """

    name: str
    default_instances: int

    def load(self, bundle: Bundle) -> Session: ...


def dynamic_batch(manifest: manifest_pb2.ModelManifest) -> bool:
    """Whether the graph's batch axis is dynamic (the frame input leads with a symbol)."""
    shape = manifest.inputs[0].shape if manifest.inputs else []
    return bool(shape) and shape[0].WhichOneof("kind") == "symbol"
