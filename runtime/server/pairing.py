"""Sets of frames from a stream's several sources, paired by capture time, for one model.

A model fed by several sources names the source of its frame input (the
*lead*) and each other source (its manifest's input bindings). Frames of
every source arrive on one stream, each with its ``Frame.source`` and
capture time. Each lead frame looks, for every other source, for the frame
captured nearest to it; the policy (``Frame.pairing``) says what is near
enough and whether to wait:

- ``wait`` (default): a partner within the tolerance; when none has arrived
  yet, the lead waits up to ``wait_ms`` (default three tolerances) for one.
- ``newest``: the newest partner already read that is not older than
  ``max_age_ms`` relative to the lead (nor newer than the tolerance); never waits.
- ``drop``: a partner already read within the tolerance; never waits.

The tolerance defaults to half the faster source's frame period, measured
from the stream's own capture times. Every frame gets exactly one answer: a
lead that makes a set goes on to the model, and its result lists its
partners and their skew; a partner is answered ``paired`` (naming its lead)
when a lead first takes it, and may serve later leads too; any frame that
cannot be in a set, at once or after its wait, is answered ``dropped:
unpaired``. Nothing is held unanswered for longer than the tolerance plus
the wait (or ``max_age_ms``), whatever the sources do: a source that stops
leaves the other's frames answered ``unpaired``, not waiting.

Capture times are the client's (``Frame.capture_time_ns``; the arrival time
for a frame without one); all sources of a stream must share a clock.
Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from edgescope.v1 import stream_pb2

# Partners kept per source, newest last: enough for sources at up to twice the lead's rate.
PARTNERS_KEPT = 4
# Until each source has shown its period: the tolerance for 30 fps sources.
DEFAULT_TOLERANCE_MS = 1000.0 / 30 / 2
# The default wait, in tolerances: room for a partner sent just after its leading frame to be delayed
# on the way. A wait costs only when the partner never comes: one sent past the reach ends it at once.
WAIT_TOLERANCES = 3
# A source whose newest frame is this much older than another's has gone silent (see ``silent``).
SILENT_S = 0.5
# Intervals per source that its period is the median of.
PERIOD_WINDOW = 9

Mode = stream_pb2.PairingPolicy.Mode


class Paired(Protocol):
    """A frame read from the stream (the stream's ``Work``)."""

    @property
    def frame(self) -> stream_pb2.Frame: ...

    @property
    def received_wall_ns(self) -> int: ...


W = TypeVar("W", bound=Paired)


def capture_ns(item: Paired) -> int:
    return item.frame.capture_time_ns or item.received_wall_ns


@dataclass(frozen=True, slots=True)
class PairingSettings:
    """A stream's policy with its defaults applied (0 tolerance: half the faster period)."""

    mode: Mode.ValueType = stream_pb2.PairingPolicy.MODE_WAIT
    tolerance_ms: float = 0.0
    wait_ms: float = 0.0
    max_age_ms: float = 0.0

    @classmethod
    def of(cls, policy: stream_pb2.PairingPolicy) -> PairingSettings:
        for name in ("tolerance_ms", "wait_ms", "max_age_ms"):
            value = getattr(policy, name)
            if not 0.0 <= value <= 10_000.0:
                raise ValueError(f"pairing {name} must be between 0 and 10000 ms, not {value}")
        return cls(
            policy.mode or stream_pb2.PairingPolicy.MODE_WAIT, policy.tolerance_ms, policy.wait_ms, policy.max_age_ms
        )


@dataclass(slots=True, eq=False)
class _Partner(Generic[W]):
    item: W
    t_ns: int
    taken: bool = False
    expiry: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class _Lead(Generic[W]):
    item: W
    t_ns: int
    expiry: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class PairingStats:
    """What a stream's pairing did: sets made, their skews, frames left unpaired per source."""

    sets: int = 0
    skews_ns: deque[int] = field(default_factory=lambda: deque(maxlen=4096))
    unpaired: dict[str, int] = field(default_factory=dict)


class Pairer(Generic[W]):
    """Pairs one stream's frames; see the module docstring.

    ``on_set(lead, partners)`` receives a lead and one partner per other
    source; ``on_taken(partner, lead)`` a partner the first time a lead takes
    it; ``on_unpaired(item)`` every frame that makes no set.
    """

    def __init__(
        self,
        lead: str,
        others: Sequence[str],
        settings: PairingSettings,
        on_set: Callable[[W, dict[str, W]], None],
        on_taken: Callable[[W, W], None],
        on_unpaired: Callable[[W], None],
        may_expire: Callable[[], bool] = lambda: True,
    ) -> None:
        self.lead = lead
        # Waits stand still while this is False: the stream is holding frames back itself (a busy model),
        # and the partners of those waiting are already sent, right behind them.
        self._may_expire = may_expire
        self.others = tuple(others)
        self.settings = settings
        self._on_set = on_set
        self._on_taken = on_taken
        self._on_unpaired = on_unpaired
        self._partners: dict[str, deque[_Partner[W]]] = {name: deque() for name in self.others}
        self._waiting: deque[_Lead[W]] = deque()
        self._last_ns: dict[str, int] = {}
        self._intervals: dict[str, deque[int]] = {name: deque(maxlen=PERIOD_WINDOW) for name in (lead, *others)}
        self._newest_lead_ns: int | None = None
        self._tolerance_ms = self._measured_tolerance_ms()
        self.stats = PairingStats()

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.lead, *self.others)

    def tolerance_ms(self) -> float:
        """The tolerance in force: as set, else half the faster source's measured period."""
        return self._tolerance_ms

    def _measured_tolerance_ms(self) -> float:
        if self.settings.tolerance_ms > 0:
            return self.settings.tolerance_ms
        periods = [statistics.median(i) for i in self._intervals.values() if len(i) >= 2]
        if len(periods) < len(self._intervals):
            return DEFAULT_TOLERANCE_MS
        return min(periods) / 2 / 1e6

    def _reach_ns(self) -> int:
        """How far before a lead a partner may have been captured and still pair with it."""
        tolerance = self.tolerance_ms()
        if self.settings.mode == stream_pb2.PairingPolicy.MODE_NEWEST:
            return int((self.settings.max_age_ms or 2 * tolerance) * 1e6)
        return int(tolerance * 1e6)

    def _wait_s(self) -> float:
        if self.settings.mode != stream_pb2.PairingPolicy.MODE_WAIT:
            return 0.0
        return (self.settings.wait_ms or WAIT_TOLERANCES * self.tolerance_ms()) / 1e3

    def add(self, item: W) -> None:
        """A frame of one of ``sources`` (the caller refuses any other)."""
        source, t_ns = item.frame.source, capture_ns(item)
        last = self._last_ns.get(source)
        if last is not None and t_ns > last:
            self._intervals[source].append(t_ns - last)
            self._tolerance_ms = self._measured_tolerance_ms()
        self._last_ns[source] = t_ns
        if source == self.lead:
            self._add_lead(_Lead(item, t_ns))
        else:
            self._add_partner(source, _Partner(item, t_ns))

    def close(self) -> None:
        """The stream ended: every frame still held is answered unpaired."""
        while self._waiting:
            self._unpaired_lead(self._waiting.popleft())
        for kept in self._partners.values():
            while kept:
                self._release(kept.popleft())

    # -- leads -------------------------------------------------------------------------------------

    def _add_lead(self, lead: _Lead[W]) -> None:
        self._newest_lead_ns = lead.t_ns if self._newest_lead_ns is None else max(self._newest_lead_ns, lead.t_ns)
        if not self._complete(lead):
            wait_s = self._wait_s()
            if wait_s <= 0:
                self._unpaired_lead(lead)
            else:
                lead.expiry = asyncio.get_running_loop().call_later(wait_s, self._expire_lead, lead, wait_s)
                self._waiting.append(lead)
        self._forget_unreachable()

    def _complete(self, lead: _Lead[W]) -> bool:
        """Make ``lead``'s set if every other source has a partner for it."""
        chosen = {name: self._partner_for(name, lead.t_ns) for name in self.others}
        found = {name: partner for name, partner in chosen.items() if partner is not None}
        if len(found) < len(self.others):
            return False
        for partner in found.values():
            if not partner.taken:
                partner.taken = True
                if partner.expiry is not None:
                    partner.expiry.cancel()
                self._on_taken(partner.item, lead.item)
        self.stats.sets += 1
        self.stats.skews_ns.extend(p.t_ns - lead.t_ns for p in found.values())
        self._on_set(lead.item, {name: p.item for name, p in found.items()})
        return True

    def _partner_for(self, source: str, t_ns: int) -> _Partner[W] | None:
        tolerance_ns = self.tolerance_ms() * 1e6
        kept = self._partners[source]
        if self.settings.mode == stream_pb2.PairingPolicy.MODE_NEWEST:
            reach_ns = self._reach_ns()
            fitting = [p for p in kept if -reach_ns <= p.t_ns - t_ns <= tolerance_ns]
            return max(fitting, key=lambda p: p.t_ns, default=None)
        fitting = [p for p in kept if abs(p.t_ns - t_ns) <= tolerance_ns]
        return min(fitting, key=lambda p: abs(p.t_ns - t_ns), default=None)

    def silent(self, item: W) -> dict[str, float]:
        """Other sources whose newest frame was captured long before ``item`` (seconds before it): stopped,
        or fallen far behind. Long means 0.5 s, or ten tolerances if that is more."""
        threshold_ns = max(SILENT_S * 1e9, 10 * self._tolerance_ms * 1e6)
        t_ns = capture_ns(item)
        return {
            name: (t_ns - self._last_ns[name]) / 1e9 if name in self._last_ns else float("inf")
            for name in self.sources
            if name != item.frame.source and t_ns - self._last_ns.get(name, 0) > threshold_ns
        }

    def _passed(self, lead: _Lead[W]) -> bool:
        """A source has already sent a frame captured past ``lead``'s reach: no partner can still come."""
        horizon_ns = lead.t_ns + self._tolerance_ms * 1e6
        return any(self._last_ns.get(name, 0) > horizon_ns for name in self.others)

    def _expire_lead(self, lead: _Lead[W], wait_s: float) -> None:
        if not self._may_expire():
            lead.expiry = asyncio.get_running_loop().call_later(wait_s, self._expire_lead, lead, wait_s)
            return
        if lead in self._waiting:
            self._waiting.remove(lead)
            self._unpaired_lead(lead)

    def _unpaired_lead(self, lead: _Lead[W]) -> None:
        if lead.expiry is not None:
            lead.expiry.cancel()
        self._count_unpaired(self.lead)
        self._on_unpaired(lead.item)

    # -- partners ----------------------------------------------------------------------------------

    def _add_partner(self, source: str, partner: _Partner[W]) -> None:
        kept = self._partners[source]
        kept.append(partner)
        # Held at most as long as a lead could still want it: its reach, plus the wait of a lead behind it.
        hold_s = self._reach_ns() / 1e9 + self._wait_s() + self.tolerance_ms() / 1e3
        partner.expiry = asyncio.get_running_loop().call_later(hold_s, self._expire_partner, source, partner, hold_s)
        for lead in list(self._waiting):
            if self._complete(lead):
                self._waiting.remove(lead)
                if lead.expiry is not None:
                    lead.expiry.cancel()
            elif self._passed(lead):
                self._waiting.remove(lead)
                self._unpaired_lead(lead)
        while len(kept) > PARTNERS_KEPT:
            self._release(kept.popleft())
        self._forget_unreachable()

    def _expire_partner(self, source: str, partner: _Partner[W], hold_s: float) -> None:
        if not self._may_expire():
            partner.expiry = asyncio.get_running_loop().call_later(
                hold_s, self._expire_partner, source, partner, hold_s
            )
            return
        kept = self._partners[source]
        if partner in kept:
            kept.remove(partner)
            self._release(partner)

    def _forget_unreachable(self) -> None:
        """Partners too old for the newest lead (and any later one) can pair no more."""
        if self._newest_lead_ns is None:
            return
        oldest_ns = self._newest_lead_ns - self._reach_ns()
        waiting_ns = min((lead.t_ns for lead in self._waiting), default=None)
        if waiting_ns is not None:
            oldest_ns = min(oldest_ns, waiting_ns - self._reach_ns())
        for kept in self._partners.values():
            while kept and kept[0].t_ns < oldest_ns:
                self._release(kept.popleft())

    def _release(self, partner: _Partner[W]) -> None:
        """A partner leaves the pairing: answered unpaired unless a lead took it."""
        if partner.expiry is not None:
            partner.expiry.cancel()
        if not partner.taken:
            partner.taken = True
            self._count_unpaired(partner.item.frame.source)
            self._on_unpaired(partner.item)

    def _count_unpaired(self, source: str) -> None:
        self.stats.unpaired[source] = self.stats.unpaired.get(source, 0) + 1
