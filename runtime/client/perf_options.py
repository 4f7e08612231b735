"""What an ``edgescope perf`` run is asked to do (``PerfOptions``), and how it fails: ``PerfError`` when
the load cannot be applied at all, ``RequestFailed`` for one request's error answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgescope.errors import EdgescopeError
from edgescope.runtime.transport import DEFAULT_MAX_MESSAGE_BYTES, ClientSecurity


class PerfError(EdgescopeError):
    """The load could not be applied (the server refused the first request, or an option is unusable)."""


class RequestFailed(Exception):
    """One request got an error answer; counted, and the load goes on."""


@dataclass(frozen=True, slots=True)
class PerfOptions:
    target: str
    model: str
    protocol: str = "kserve"
    concurrency: Sequence[int] = (1,)
    # Requests per second; when given, the sweep is over these instead of concurrency.
    request_rates: Sequence[float] = ()
    distribution: str = "constant"
    batch_size: int = 1
    # Sizes for dynamic dimensions other than the batch: input name -> shape without the batch.
    shapes: dict[str, list[int]] = field(default_factory=dict)
    source: str = "synthetic:ultrasound"
    stream_lanes: int = 4
    warmup_s: float = 2.0
    window_s: float = 2.0
    stability: float = 0.10
    stable_windows: int = 3
    max_windows: int = 10
    # Rate steps never keep more than this many requests outstanding; later slots count as delayed.
    max_outstanding: int = 256
    request_timeout_s: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    seed: int = 0
    # TLS and the bearer token, as for every other client command (plain text only to loopback).
    security: ClientSecurity = field(default_factory=ClientSecurity)
