"""What a failure inside torch's ONNX exporters means, in one line that says what to do.

torch.onnx.export raises a report of many lines whose cause sits at the end
of a chain of exceptions. ``explain`` finds that cause and recognises the
failures a real model meets:

- a dynamic batch axis the model's code cannot keep (``--static-batch``);
- control flow that depends on tensor values (data-dependent branches);
- an operator with no ONNX conversion at the opset (replace it, or ``--opset``);
- returned values that are not tensors (``--output``).

The message names the cause and the user code line torch points at; the
full report stays on the exception chain, which ``--debug`` prints.
"""

from __future__ import annotations

import re

_USER_LINE = re.compile(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)')
_OPERATOR = re.compile(r"op='([^']+)'|operator '([^']+)'|for <OpOverload\(op='([^']+)'")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


def _summary(chain: list[BaseException]) -> str:
    """The root cause in one line: torch's own summary if it wrote one, else the innermost message."""
    for exc in chain:
        text = str(exc)
        marker = text.find("## Exception summary")
        if marker >= 0:
            found = re.search(r"<class '([\w.]+)'>: (.+)", text[marker:])
            if found:
                return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2).strip()[:200]}"
    root = chain[-1]
    return f"{type(root).__name__}: {_first_line(str(root))}"


def _where(chain: list[BaseException]) -> str:
    """`` at model.py:12 `if x.mean() > 0.5:``` where torch names the user's line."""
    for exc in chain:
        found = _USER_LINE.search(str(exc).split("The following call raised this error:")[-1])
        if found and "site-packages" not in found.group(1):
            path, line, code = found.groups()
            return f" at {path.rsplit('/', 1)[-1]}:{line} `{code.strip()[:80]}`"
    return ""


def explain(exc: BaseException, *, static_batch: bool, opset: int) -> str:
    """One line: what failed, what to do, and torch's cause (``--debug`` shows its full report)."""
    chain = _chain(exc)
    names = " ".join(type(e).__name__ for e in chain)
    text = "\n".join(str(e) for e in chain)
    lowered = text.lower()
    cause = _summary(chain)
    tail = f"({cause}; --debug shows torch's full report)"
    if "GuardOnDataDependent" in names or "data-dependent" in lowered or "data dependent" in lowered:
        return (
            f"the model branches on tensor values{_where(chain)} (data-dependent control flow), which a graph "
            "cannot hold: compute that decision outside forward, or express it with torch.where or torch.cond " + tail
        )
    operator = _OPERATOR.search(text)
    if "DispatchError" in names or "UnsupportedOperator" in names or "is not supported" in lowered:
        op = next((g for g in operator.groups() if g), "an operator") if operator else "an operator"
        return (
            f"{op} has no ONNX conversion at opset {opset}: replace it in the model with supported operations, "
            f"or try another --opset {tail}"
        )
    dynamic_words = ("constraints violated", "invalid ranges", "specializ", "dynamic_shapes", "dynamic shape")
    if not static_batch and ("ConstraintViolation" in names or any(w in lowered for w in dynamic_words)):
        return (
            f"the model does not export with a dynamic batch axis{_where(chain)}: make its code batch-agnostic, "
            f"or export with --static-batch (one frame per inference, no batching across streams) {tail}"
        )
    if "node return" in lowered:
        return (
            "the model returns values that are not tensors, which a graph cannot hold: pass --output with the "
            f"tensors the task takes {tail}"
        )
    return f"torch.onnx.export failed{_where(chain)}: {cause} (--debug shows torch's full report)"
