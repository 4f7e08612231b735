"""The models a server serves: name -> model (bundle, route to its workers, provenance).

Frames take a model with ``lease`` and give it back with ``release``. A model
replaced or unloaded while leased is retired: it takes no new leases, and its
workers are stopped when the last lease is returned. Stopping lets queued and
running jobs finish before each session is closed on its own thread, so a
reload never fails a frame and never closes a session under a running call.
Models are keyed by identity, never by ``id()``.

A model runs on the server's backend; with a fallback backend it also has a
second worker that takes over when the first fails (``failover``). Every
session is checked on its own thread before it serves: a warm-up, then the
bundle's golden frames through that very session on this device (the
self-test of ``edgescope.runtime.evaluation``). A session that does not
reproduce them is not served (``SelfTestFailedError``, with the reasons),
unless the bundle already failed its gate at export and the server serves
such bundles (``--allow-failed-validation``): then the verdict is only
recorded, and every result says so. ``--skip-self-test`` skips it for
experiments, and every result says that too.

Loading (reading, checking, warming up) is blocking: call ``load`` from the
server's loader thread, never the event loop or the frame threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from edgescope.bundle import Bundle
from edgescope.errors import BundleError, ConfigError, EdgescopeError, ModelNotFoundError, SelfTestFailedError
from edgescope.runtime.archive.audit import AuditTrail
from edgescope.runtime.backends.base import Backend, Session, SessionCapabilities
from edgescope.runtime.evaluation.machine import machine_summary
from edgescope.runtime.evaluation.runners import describe
from edgescope.runtime.evaluation.selftest import self_test
from edgescope.runtime.pipeline.domain import DomainScorer
from edgescope.runtime.pipeline.drift import DEFAULT_FALSE_ALARM_HOURS, false_alarm_frames
from edgescope.runtime.pipeline.manifest_check import check_manifest
from edgescope.runtime.pipeline.preprocess import input_channels
from edgescope.runtime.pipeline.state import ModelState, is_stateful, source_inputs
from edgescope.runtime.pipeline.tta import FLIP, tta_refusal
from edgescope.runtime.pipeline.tta import OFF as TTA_OFF
from edgescope.runtime.server.failover import ModelRoute
from edgescope.runtime.server.grpc_status import echo
from edgescope.runtime.server.repository import BundlePolicy, ModelRepository
from edgescope.runtime.server.statistics import ModelStatistics
from edgescope.runtime.server.workers import Job, ModelWorker
from edgescope.v1 import manifest_pb2, stream_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How each model's worker runs: instances, and batching for the models that allow it."""

    instances: int = 1
    max_batch: int = 8
    batch_delay_s: float = 0.0


ANNOTATE, WITHHOLD = "annotate", "withhold"
# ``fallback:OTHER``: a frame out of the model's domain is answered by model OTHER.
FALLBACK = "fallback:"


def fallback_model(policy: str) -> str:
    """The model a ``fallback:OTHER`` policy names; empty for any other policy."""
    return policy.removeprefix(FALLBACK) if policy.startswith(FALLBACK) else ""


# The key of a setting for every model without one of its own.
ALL_MODELS = "*"


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """What a model's results do when the frame is out of domain or the answer unsure."""

    # annotate: flag and alert, quantities kept; withhold: the quantities removed, Result.withheld says why.
    out_of_domain: str = ANNOTATE
    # Under withhold, an answer less sure than this (Result.confidence) is withheld too; 0: never.
    min_confidence: float = 0.0
    # Test-time augmentation: off, or flip (the frame and its mirror image in one inference, averaged).
    tta: str = TTA_OFF


@dataclass(frozen=True, slots=True)
class MonitoringOptions:
    """How the server watches its input and answers (``serve --drift-false-alarm-hours``, ``--out-of-domain``,
    ``--min-confidence``, ``--tta``); the per-model settings by model name, ``ALL_MODELS`` for the rest."""

    # Expected in-domain time between false drift alerts, counted at ``drift.FRAME_RATE``.
    drift_false_alarm_hours: float = DEFAULT_FALSE_ALARM_HOURS
    out_of_domain: Mapping[str, str] = field(default_factory=dict)
    min_confidence: Mapping[str, float] = field(default_factory=dict)
    tta: Mapping[str, str] = field(default_factory=dict)

    def policy(self, model: str) -> ModelPolicy:
        return ModelPolicy(
            self.out_of_domain.get(model, self.out_of_domain.get(ALL_MODELS, ANNOTATE)),
            self.min_confidence.get(model, self.min_confidence.get(ALL_MODELS, 0.0)),
            self.tta.get(model, self.tta.get(ALL_MODELS, TTA_OFF)),
        )


@dataclass(frozen=True, slots=True, eq=False)
class ServedModel:
    """One loaded version of a model. Hashed by identity: a reload is a different object."""

    name: str
    bundle: Bundle
    route: ModelRoute
    # Scores every frame against the bundle's domain profile (None: the bundle has none; not checked).
    domain: DomainScorer | None = None
    policy: ModelPolicy = ModelPolicy()

    @property
    def manifest(self) -> manifest_pb2.ModelManifest:
        return self.bundle.manifest

    @property
    def self_test(self) -> manifest_pb2.SelfTestReport | None:
        """The primary's golden-frame verdict on this device (None when skipped)."""
        return self.worker.self_test

    @property
    def statistics(self) -> ModelStatistics:
        """Every execution of this model version, primary and fallback alike."""
        return self.worker.statistics

    @property
    def worker(self) -> ModelWorker:
        """The primary worker (the fallback serves only while the model is degraded)."""
        return self.route.primary

    @property
    def provenance(self) -> stream_pb2.Provenance:
        """What results carry now: the primary's, or the fallback's marked degraded."""
        return self.route.provenance

    @property
    def capabilities(self) -> SessionCapabilities:
        if self.worker.capabilities is None:
            raise BundleError(f"model {self.name} has no running session")
        return self.worker.capabilities

    @property
    def batchable(self) -> bool:
        """Frames of different streams may share one inference."""
        # Only the frame input is stacked across streams: a model fed by other sources runs frame by frame.
        return self.capabilities.dynamic_batch and not is_stateful(self.manifest) and not source_inputs(self.manifest)

    @property
    def batches_requests(self) -> bool:
        """KServe requests may share one inference (as rows of the model's one input, which is float)."""
        inputs = self.manifest.inputs
        return self.batchable and len(inputs) == 1 and inputs[0].dtype == manifest_pb2.DATA_TYPE_FLOAT32

    def infer(self, job: Job[T]) -> Awaitable[T]:
        """Queue ``job`` now and return its answer to await (see ``ModelRoute.infer``)."""
        return self.route.infer(job)


def _verdict(report: manifest_pb2.SelfTestReport | None) -> str:
    """One line for provenance: which runner reproduced how many golden frames, on what."""
    if report is None:
        return "skipped (--skip-self-test): nothing checked this device's numbers"
    word = "passed" if report.passed else "FAILED"
    return f"{word}: {report.frames} golden frames on {describe(report.runner)}, {machine_summary(report.machine)}"


def warm_up(session: Session, manifest: manifest_pb2.ModelManifest) -> None:
    """Run one zero frame: the first run allocates and picks kernels; pay that before serving."""

    def zeros(pre: manifest_pb2.Preprocessing) -> npt.NDArray[np.float32]:
        channels = input_channels(pre)
        nhwc = pre.layout == manifest_pb2.LAYOUT_NHWC
        return np.zeros(
            (1, pre.height, pre.width, channels) if nhwc else (1, channels, pre.height, pre.width), np.float32
        )

    # Stateful models also take their initial state (and a previous frame); fusion models their other sources.
    sources = {
        binding.input: np.zeros((1, binding.signal.channels, binding.signal.samples), np.float32)
        if binding.HasField("signal")
        else zeros(binding.preprocessing)
        for binding in source_inputs(manifest)
    }
    session.infer(ModelState(manifest).feed(zeros(manifest.preprocessing), sources))


class ModelRegistry:
    """Name -> served model; thread-safe. Owns every worker it started until ``close``."""

    def __init__(
        self,
        backend: Backend,
        options: WorkerOptions | None = None,
        *,
        fallback: Backend | None = None,
        policy: BundlePolicy | None = None,
        warm: bool = True,
        run_self_test: bool = True,
        audit: AuditTrail | None = None,
        monitoring: MonitoringOptions | None = None,
    ) -> None:
        self.backend = backend
        self.fallback = fallback
        self.options = options or WorkerOptions()
        self.monitoring = monitoring or MonitoringOptions()
        # The server's own rule for every bundle (integrity, signatures, failed gate); no request relaxes it.
        self.policy = policy or BundlePolicy()
        self._warm = warm
        self._run_self_test = run_self_test
        self._models: dict[str, ServedModel] = {}
        # Models that could not be served, and why (a failed load or self-test).
        self._failed: dict[str, str] = {}
        self._leases: dict[ServedModel, int] = {}
        self._retired: set[ServedModel] = set()
        # Routes told to stop, kept so close() can wait for their workers.
        self._stopping: list[ModelRoute] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        # Where loads, refusals, unloads and failovers are recorded, with who asked (``serve --audit-log``).
        self.audit = audit
        self.on_degraded: Callable[[str, str], None] = lambda _model, _reason: None

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a model is served, replaced, removed or refused."""
        self._listeners.append(listener)
        listener()

    def load_named(
        self, repository: ModelRepository, bundle: str, name: str | None = None, who: str = "server"
    ) -> ServedModel:
        """LoadModel and KServe's RepositoryModelLoad alike: the bundle of that name in ``repository``,
        replacing a loaded model of the same name once the new one is ready (blocking: the loader's work).

        The model is served under ``name`` when one is asked for; otherwise under the entry's name,
        which must then be the name its manifest gives (an entry cannot stand in for another model).
        A load that fails leaves nothing behind: the error goes to the caller.
        """
        try:
            opened = self.policy.open(repository.resolve(bundle))
        except EdgescopeError as exc:
            self._record("model_refused", who, model=name or bundle, bundle=bundle, reason=str(exc))
            raise
        if name is None and opened.manifest.name != bundle:
            error = BundleError(
                f"repository entry {echo(bundle)} holds a model named {echo(opened.manifest.name)}: name the entry "
                "after its model, or ask for the name to serve it under (LoadModelRequest.name)"
            )
            self._record("model_refused", who, model=bundle, bundle=bundle, reason=str(error))
            raise error
        return self._load(opened, name or bundle, replace=True, remember_failure=False, who=who)

    def load(self, path: Path, *, name: str | None = None, replace: bool = False) -> ServedModel:
        """Load, check and start a bundle's workers, then publish it (replacing a same-named model if asked).

        A bundle that cannot be served raises, and is listed as not served, with why (``failed``).
        """
        try:
            bundle = self.policy.open(path)
        except EdgescopeError as exc:
            self._record("model_refused", "server", model=name or path.name, bundle=str(path), reason=str(exc))
            raise
        return self._load(bundle, name or bundle.manifest.name, replace=replace, remember_failure=True, who="server")

    def _record(self, event: str, who: str, **fields: object) -> None:
        if self.audit is not None:
            self.audit.append(event, by=who, **fields)

    def _load(self, bundle: Bundle, model_name: str, *, replace: bool, remember_failure: bool, who: str) -> ServedModel:
        try:
            check_manifest(bundle.manifest)
            model = self._start(bundle, model_name, replace)
        except EdgescopeError as exc:
            self._record("model_refused", who, model=model_name, bundle=str(bundle.path), reason=str(exc))
            if remember_failure:
                with self._lock:
                    if model_name not in self._models:
                        self._failed[model_name] = str(exc)
                self._notify()
            raise
        with self._lock:
            old = self._models.get(model_name)
            if old is not None and not replace:
                model.route.retire()
                raise ConfigError(f"a model named {echo(model_name)} is already loaded")
            self._models[model_name] = model
            self._failed.pop(model_name, None)
            if old is not None:
                self._retire(old)
        provenance = model.provenance
        self._record(
            "model_loaded",
            who,
            model=model_name,
            version=bundle.manifest.version,
            bundle=str(bundle.path),
            sha256=provenance.sha256,
            signer=bundle.signer,
            backend=provenance.backend,
            device=provenance.device,
            self_test=provenance.self_test,
            replaced=old is not None,
        )
        self._notify()
        return model

    def _start(self, bundle: Bundle, model_name: str, replace: bool) -> ServedModel:
        if not replace:
            with self._lock:
                if model_name in self._models:
                    raise ConfigError(f"a model named {echo(model_name)} is already loaded")
        statistics = ModelStatistics(model_name, bundle.manifest.version)
        primary = self._open(bundle, self.backend, model_name, statistics)
        fallback = None
        if self.fallback is not None:
            try:
                fallback = self._open(bundle, self.fallback, model_name, statistics)
            except BaseException:
                primary.retire()
                raise
        route = ModelRoute(
            model_name, primary, fallback, lambda: self._open(bundle, self.backend, model_name, statistics)
        )
        route.on_change = self._degraded
        drift_frames = false_alarm_frames(self.monitoring.drift_false_alarm_hours)
        scorer = DomainScorer(bundle.manifest, drift_frames) if bundle.manifest.HasField("domain") else None
        policy = self.monitoring.policy(model_name)
        if policy.tta == FLIP:
            workers = [primary] if fallback is None else [primary, fallback]
            dynamic = all(w.capabilities is not None and w.capabilities.dynamic_batch for w in workers)
            refusal = tta_refusal(bundle.manifest, dynamic)
            if refusal is not None:
                for worker in workers:
                    worker.retire()
                raise ConfigError(f"--tta flip cannot run on {echo(model_name)}: {refusal}")
        return ServedModel(model_name, bundle, route, scorer, policy)

    def _open(self, bundle: Bundle, backend: Backend, name: str, statistics: ModelStatistics) -> ModelWorker:
        """A started worker for ``bundle`` on ``backend``: sessions open, warmed up, self-tested."""
        manifest = bundle.manifest
        warm, testing = self._warm, self._run_self_test
        reports: list[manifest_pb2.SelfTestReport] = []
        runners: list[manifest_pb2.RunnerInfo] = []

        def check(session: Session) -> None:
            runners.append(session.describe())
            if warm:
                warm_up(session, manifest)
            if not testing:
                return
            report = self_test(bundle, session.infer, runners[-1])
            reports.append(report)
            # A bundle served despite a failed gate would fail here too: its verdict is recorded, not enforced.
            if not report.passed and manifest.validation.passed:
                raise SelfTestFailedError(
                    f"{name} did not reproduce its golden frames on this device ({describe(report.runner)}, "
                    f"{machine_summary(report.machine)}): {'; '.join(report.reasons)}"
                )

        worker = ModelWorker(
            name,
            lambda: backend.load(bundle),
            instances=self.options.instances,
            max_batch=self.options.max_batch,
            batch_delay_s=self.options.batch_delay_s,
            check=check,
            statistics=statistics,
        )
        worker.start()
        assert worker.capabilities is not None  # start() sets it or raises
        runner = runners[0]
        worker.self_test = reports[0] if reports else None
        worker.provenance = stream_pb2.Provenance(
            model=name,
            version=manifest.version,
            # What ran: the graph, or the engine built from it, in its own precision.
            sha256=runner.artifact_sha256 or bundle.onnx_sha256,
            backend=backend.name,
            precision=runner.precision or manifest.precision,
            device=worker.capabilities.device,
            self_test=_verdict(worker.self_test),
            self_test_skipped=not testing,
            failed_validation=not manifest.validation.passed,
            signer=bundle.signer,
        )
        return worker

    def _degraded(self, model: str, reason: str) -> None:
        self._record("model_degraded" if reason else "model_restored", "server", model=model, reason=reason)
        self.on_degraded(model, reason)

    def unload(self, name: str, who: str = "server") -> None:
        """Stop serving ``name``; a model that could not be served is forgotten, with why."""
        with self._lock:
            model = self._models.pop(name, None)
            if model is None:
                if self._failed.pop(name, None) is None:
                    raise ModelNotFoundError(f"model {echo(name)} is not loaded")
            else:
                self._retire(model)
        self._record("model_unloaded", who, model=name)
        self._notify()

    def _retire(self, model: ServedModel) -> None:
        """Stop the model taking leases; its workers stop now if unleased, else with its last lease."""
        if self._leases.get(model, 0) == 0:
            self._stop(model.route)
        else:
            self._retired.add(model)

    def lease(self, name: str) -> ServedModel:
        """The current model of that name; its workers keep running until ``release``."""
        with self._lock:
            model = self._lookup(name)
            self._leases[model] = self._leases.get(model, 0) + 1
            return model

    def release(self, model: ServedModel) -> None:
        with self._lock:
            left = self._leases[model] - 1
            if left:
                self._leases[model] = left
                return
            del self._leases[model]
            if model not in self._retired:
                return
            self._retired.discard(model)
            self._stop(model.route)

    def _stop(self, route: ModelRoute) -> None:
        route.retire()
        # Forget the routes whose workers are gone; keep the others for close().
        self._stopping = [r for r in self._stopping if not all(w.join(0) for w in r.workers())]
        self._stopping.append(route)

    def get(self, name: str) -> ServedModel:
        with self._lock:
            return self._lookup(name)

    def _lookup(self, name: str) -> ServedModel:
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise ModelNotFoundError(
                f"the frame names no model and {len(self._models)} are loaded; "
                f"set Frame.model to one of: {', '.join(sorted(self._models)) or '(none)'}"
            )
        model = self._models.get(name)
        if model is None:
            why = self._failed.get(name)
            if why is not None:
                raise ModelNotFoundError(f"model {echo(name)} is not served: {why}")
            raise ModelNotFoundError(
                f"model {echo(name)} is not loaded; loaded models: {', '.join(sorted(self._models)) or '(none)'}"
            )
        return model

    def all(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def failed(self) -> dict[str, str]:
        """Models that could not be served, and why."""
        with self._lock:
            return dict(self._failed)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def close(self, timeout_s: float = 30.0) -> None:
        """Retire every model (leased or not), then wait up to ``timeout_s`` in all for their workers to close."""
        with self._lock:
            routes = [m.route for m in (*self._models.values(), *self._retired, *self._leases)] + self._stopping
            self._models, self._retired, self._leases, self._stopping = {}, set(), {}, []
        for route in routes:
            route.retire()
        deadline = time.monotonic() + timeout_s
        for route in routes:
            for worker in route.workers():
                worker.join(max(0.0, deadline - time.monotonic()))
