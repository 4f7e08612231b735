"""Every module that touches TensorRT passes ``mypy --strict`` against the stubs of TensorRT 10 and of 11.

The stubs (``typings/tensorrt10``, ``typings/tensorrt11``) declare the part of
each generation's Python API that edgescope uses, with its signatures; what 11
removed is absent from its stubs. So a call to a method one generation lacks,
or with arguments of the wrong type, fails here without a GPU or TensorRT.
tests/test_tensorrt_api.py checks the stubs' names against the real bindings.

mypy reads the installed layout (``edgescope.export`` lives in ``export/``), so
it runs in a link tree that mirrors it, as ``make typecheck`` does.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytest.importorskip("mypy", reason="mypy comes with the dev extra")

STUBS = {major: ROOT / "typings" / f"tensorrt{major}" for major in (10, 11)}
PACKAGES = {"edgescope": ROOT / "edgescope", "edgescope.export": ROOT / "export", "edgescope.runtime": ROOT / "runtime"}
TREE = ROOT / "build" / "typecheck-tensorrt"
# A module checked with the code: it uses what TensorRT 10 (build_engine) and 11 (the FP16 flag) removed, so
# each run must report exactly its errors, which shows the stubs were read (a missing stub would be Any).
PROBE = "tensorrt_probe"
PROBE_SOURCE = """import tensorrt

tensorrt.Builder.build_engine
tensorrt.BuilderFlag.FP16
"""
PROBE_ERRORS = {
    10: ['tensorrt_probe.py:3: error: "type[Builder]" has no attribute "build_engine"  [attr-defined]'],
    11: [
        'tensorrt_probe.py:3: error: "type[Builder]" has no attribute "build_engine"  [attr-defined]',
        'tensorrt_probe.py:4: error: "type[BuilderFlag]" has no attribute "FP16"  [attr-defined]',
    ],
}


def _imports_tensorrt(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.Import) and any(alias.name == "tensorrt" for alias in node.names)
        for node in ast.walk(tree)
    )


def tensorrt_modules() -> list[str]:
    """The installed names of the package's modules that import tensorrt."""
    modules = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if _imports_tensorrt(path):
                modules.append(".".join((package, *path.relative_to(folder).with_suffix("").parts)))
    return modules


def test_the_modules_that_touch_tensorrt_are_found() -> None:
    # A search that found nothing would check nothing.
    assert {
        "edgescope.engines",
        "edgescope.export.tensorrt._trt",
        "edgescope.export.tensorrt.builder",
        "edgescope.export.tensorrt.calibrator",
        "edgescope.runtime.backends.tensorrt",
        "edgescope.runtime.doctor",
    } <= set(tensorrt_modules())


def _link_tree() -> Path:
    # Files are links to the checkout, so mypy's cache (kept in build/) stays valid between runs.
    shutil.rmtree(TREE, ignore_errors=True)
    shutil.copytree(
        ROOT / "edgescope", TREE / "edgescope", copy_function=os.symlink, ignore=shutil.ignore_patterns("__pycache__")
    )
    (TREE / "edgescope" / "export").symlink_to(ROOT / "export")
    (TREE / "edgescope" / "runtime").symlink_to(ROOT / "runtime")
    (TREE / f"{PROBE}.py").write_text(PROBE_SOURCE, encoding="utf-8")
    return TREE


@pytest.mark.parametrize("major", sorted(STUBS))
def test_mypy_strict_against_the_stubs(major: int) -> None:
    tree = _link_tree()
    modules = [arg for module in [*tensorrt_modules(), PROBE] for arg in ("-m", module)]
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(ROOT / "build" / f"mypy-cache-tensorrt{major}"),
        "--no-error-summary",
        "--hide-error-context",
        *modules,
    ]
    environment = {**os.environ, "MYPYPATH": str(STUBS[major])}
    done = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True, timeout=280, check=False)
    errors = [line for line in done.stdout.splitlines() if line.strip()]
    report = f"mypy --strict against the TensorRT {major} stubs:\n{done.stdout}{done.stderr}"
    assert errors == PROBE_ERRORS[major], report
