"""Several named sources as one, for a model fed by several (``edgescope stream --source NAME=SPEC ...``).

Frames come out in presentation-time order across the sources, each tagged
with its source's name (``SourceFrame.source``) and keeping its own
timestamp, so a paced stream sends every source at its own rate. A source
that ends leaves the others going; the merge ends when every source has.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from edgescope.errors import ConfigError
from edgescope.runtime.sources.base import FrameSource, SourceFrame, SourceKind

# ``NAME=SPEC``: a name as the model's manifest gives its sources.
_NAMED = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_-]{0,31})=(?P<spec>.+)$")


def named_sources(values: Sequence[str]) -> dict[str, str]:
    """Source arguments: one SPEC (named ""), or each NAME=SPEC with distinct names."""
    if len(values) == 1 and _NAMED.match(values[0]) is None:
        return {"": values[0]}
    named: dict[str, str] = {}
    for value in values:
        match = _NAMED.match(value)
        if match is None:
            raise ConfigError(
                f"source {value[:60]!r}: with several sources, each is NAME=SPEC (e.g. nir=synthetic:fluorescence)"
            )
        if match["name"] in named:
            raise ConfigError(f"source {match['name']!r} is named twice")
        named[match["name"]] = match["spec"]
    return named


def open_sources(named: Mapping[str, str], loop: bool = False) -> FrameSource:
    """The one source, or the named ones merged (see ``named_sources``)."""
    from edgescope.runtime.sources import open_source

    if "" in named:
        return open_source(named[""], loop=loop)
    opened: dict[str, FrameSource] = {}
    try:
        for name, spec in named.items():
            opened[name] = open_source(spec, loop=loop)
    except BaseException:
        for source in opened.values():
            source.close()
        raise
    return MergedSources(opened)


def describe_sources(named: Mapping[str, str]) -> str:
    return " + ".join(f"{name}={spec}" if name else spec for name, spec in named.items())


class MergedSources:
    """Named sources merged by timestamp; the first named is the one whose kind and rate lead."""

    def __init__(self, sources: Mapping[str, FrameSource]) -> None:
        if len(sources) < 2:
            raise ConfigError("merging sources needs at least two")
        self._sources = dict(sources)
        self.names = tuple(self._sources)

    @property
    def kind(self) -> SourceKind:
        return self._sources[self.names[0]].kind

    @property
    def fps(self) -> float:
        """Frames per second of all the sources together."""
        return sum(source.fps for source in self._sources.values())

    def fps_of(self, name: str) -> float:
        return self._sources[name].fps

    def __iter__(self) -> Iterator[SourceFrame]:
        iterators = {name: iter(source) for name, source in self._sources.items()}
        heap: list[tuple[float, int, str, SourceFrame]] = []
        # The order the sources were named breaks timestamp ties, so a set's frames leave together.
        order = {name: index for index, name in enumerate(self.names)}

        def pull(name: str) -> None:
            frame = next(iterators[name], None)
            if frame is not None:
                heapq.heappush(heap, (frame.timestamp_s, order[name], name, replace(frame, source=name)))

        for name in self.names:
            pull(name)
        while heap:
            _, _, name, frame = heapq.heappop(heap)
            yield frame
            pull(name)

    def close(self) -> None:
        for source in self._sources.values():
            source.close()

    def __enter__(self) -> MergedSources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
