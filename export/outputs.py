"""Which of a model's returned values become the graph's outputs.

A model may return one tensor, or a tuple, list or dict of values: MONAI's
VarAutoEncoder returns ``(reconstruction, mu, logvar, z)``, its ViT
``(logits, hidden_states)``. The graph holds only what the task reads (the
task output, then detection scores and next states: ``tasks.output_names``);
``--output`` names the returned values that are those, by position or by
name (a dict's key, a named tuple's field). The rest are dropped from the
graph, and the exporter prunes what only they needed (the VAE's ``logvar``
head): the runtime never reads them, and every device would otherwise
compute and copy them on each frame.

Before anything is exported the model runs once on the first frame, so a
model that returns more values than the task takes is refused with what it
returns and the ``--output`` to pass, instead of failing deep inside torch's
exporter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from edgescope.errors import ConfigError, ExportError

if TYPE_CHECKING:
    import torch


def _describe(value: object) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}"
    if isinstance(value, tuple | list):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _entries(result: object) -> list[tuple[str, object]]:
    """The returned values with the name each can be chosen by (a position, a key or a field)."""
    if isinstance(result, Mapping):
        return [(str(key), value) for key, value in result.items()]
    fields = getattr(result, "_fields", None)
    if isinstance(result, tuple) and fields is not None:
        return [(str(name), value) for name, value in zip(fields, result, strict=True)]
    if isinstance(result, tuple | list):
        return [(str(index), value) for index, value in enumerate(result)]
    return [("0", result)]


def describe_result(result: object) -> str:
    """``tuple of 4 (0: tensor (1, 1, 64, 64), 1: tensor (1, 8), ...)`` for an error message."""
    entries = _entries(result)
    listed = ", ".join(f"{name}: {_describe(value)}" for name, value in entries[:8])
    more = f", ... {len(entries) - 8} more" if len(entries) > 8 else ""
    return f"{_describe(result)} ({listed}{more})"


def _position(result: object, key: str) -> int | str:
    """Where ``key`` points in ``result``: a position in the returned sequence or a dict's key."""
    if isinstance(result, Mapping):
        if key in result:
            return key
        if key.isdigit() and int(key) < len(result):
            return int(key)
        raise ConfigError(f"--output {key!r}: the model returns a dict with keys {', '.join(map(str, result))}")
    fields = getattr(result, "_fields", None)
    if fields is not None and key in fields:
        return int(fields.index(key))
    if isinstance(result, tuple | list):
        if key.isdigit() and int(key) < len(result):
            return int(key)
        raise ConfigError(
            f"--output {key!r}: the model returns a {type(result).__name__} of {len(result)}; "
            f"choose a position 0..{len(result) - 1}" + (f" or a field ({', '.join(fields)})" if fields else "")
        )
    raise ConfigError(f"--output {key!r}: the model returns a single {_describe(result)}; leave --output out")


def select_outputs(model: torch.nn.Module, keys: Sequence[str], result: object) -> torch.nn.Module:
    """``model`` returning only the values ``keys`` name, in that order (one value: the tensor itself)."""
    import torch

    positions = [_position(result, key) for key in keys]

    class SelectedOutputs(torch.nn.Module):
        """The wrapped model's chosen return values; the others leave the graph."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
            returned = self.model(*inputs)
            values = list(returned.values()) if isinstance(returned, dict) else returned
            chosen = tuple(returned[p] if isinstance(p, str) else values[p] for p in positions)
            return chosen[0] if len(chosen) == 1 else chosen

    return SelectedOutputs(model).eval()


def task_model(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], keys: Sequence[str], expected: Sequence[str]
) -> torch.nn.Module:
    """The module whose ``forward`` returns exactly the ``expected`` graph outputs, in order.

    Runs ``model`` once on ``example``; raises ExportError naming what it
    returns when that is not what the task takes (and ``--output`` to pass).
    """
    import torch

    try:
        with torch.no_grad():
            result = model(*example)
    except Exception as exc:  # the user's code may raise anything; say where it happened
        shapes = ", ".join(str(tuple(t.shape)) for t in example)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ExportError(
            f"the model fails on the first frame, input {shapes}: {type(exc).__name__}: {first} "
            "(check --input-size, --channels and the model's expected input; --debug shows the traceback)"
        ) from exc
    if keys:
        if len(keys) != len(expected):
            raise ConfigError(
                f"--output names {len(keys)} value(s); the graph takes {len(expected)}: {', '.join(expected)}"
            )
        model = select_outputs(model, keys, result)
        with torch.no_grad():
            result = model(*example)
    values = _entries(result) if isinstance(result, tuple | list | Mapping) else [("0", result)]
    wanted = ", ".join(expected)
    if isinstance(result, Mapping) or len(values) != len(expected):
        example_keys = ",".join(name for name, _ in values[: len(expected)])
        raise ExportError(
            f"the model returns a {describe_result(result)}; the graph takes {len(expected)} ({wanted}): "
            f"pass --output with the position or name of each, in that order (e.g. --output {example_keys})"
        )
    for name, value in values:
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"the model's returned value {name} is a {_describe(value)}, not a tensor; "
                f"pass --output with the tensors the graph takes ({wanted})"
            )
    return model
