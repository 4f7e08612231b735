"""The distribution's shape: one namespace, lazy heavy imports, fresh generated code."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_in_the_distribution() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for prefix, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix, *relative)))
    assert found <= listed, f"package folders missing from pyproject: {sorted(found - listed)}"


def test_runtime_and_export_do_not_import_torch() -> None:
    code = (
        "import sys, edgescope.runtime.server.app, edgescope.runtime.client.stream, edgescope.export, edgescope.cli; "
        "print(sorted(m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_checked_in_protobuf_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True, env=env, timeout=120
    )
    generated = sorted(p.name for p in (tmp_path / "edgescope" / "v1").iterdir())
    checked_in = sorted(
        p.name for p in (ROOT / "edgescope" / "v1").iterdir() if p.name != "__init__.py" and p.is_file()
    )
    assert generated == checked_in
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "edgescope" / "v1", ROOT / "edgescope" / "v1", generated, shallow=False
    )
    assert not mismatch and not errors, f"stale generated code (run `make proto`): {mismatch + errors}"


def test_the_wheel_installs_everything_under_one_namespace(tmp_path: Path) -> None:
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "--wheel-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("edgescope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.startswith("edgescope-")}
    assert top_level == {"edgescope"}
    for required in ("edgescope/export/api.py", "edgescope/runtime/server/app.py", "edgescope/runtime/web/index.html",
                     "edgescope/v1/stream_pb2.pyi", "edgescope/py.typed"):  # fmt: skip
        assert required in names
