"""Export's failures: one first line that says what is wrong and what to do, torch's report only with --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgescope.cli import main
from edgescope.errors import ConfigError, ExportError

from .conftest import ROOT

torch = pytest.importorskip("torch")

from edgescope.export import ExportRequest, export_model  # noqa: E402

MODELS = '''
import torch


class Branches(torch.nn.Module):
    """Decides on a tensor's value: a graph cannot hold that."""

    def forward(self, x):
        if x.mean() > 0.5:
            return x * 2.0
        return x


class Eigen(torch.nn.Module):
    """An operator with no ONNX conversion."""

    def forward(self, x):
        gram = x[:, 0] @ x[:, 0].transpose(1, 2)
        return torch.linalg.eigh(gram)[0][:, None, :, None] * x


def branches():
    return Branches()


def eigen():
    return Eigen()
'''


@pytest.fixture
def factories(tmp_path: Path) -> str:
    path = tmp_path / "failing.py"
    path.write_text(MODELS)
    return f"{path}:"


def _export(factory: str, out: Path) -> None:
    request = ExportRequest(
        name="m", output=out, factory=factory, input_height=16, input_width=16, samples=2, labels=["b", "f"]
    )
    export_model(request, log=lambda _line: None)


def test_data_dependent_control_flow_names_the_line_and_what_to_do(factories: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as failed:
        _export(factories + "branches", tmp_path / "b")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("the model branches on tensor values at failing.py:9 `if x.mean() > 0.5:`")
    assert "torch.where or torch.cond" in message and "--debug" in message
    assert "GuardOnDataDependentSymNode" in message


def test_an_operator_without_an_onnx_conversion_is_named(factories: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError) as failed:
        _export(factories + "eigen", tmp_path / "e")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("aten._linalg_eigh has no ONNX conversion at opset 18")
    assert "--opset" in message


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgescope.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_the_cli_prints_one_line_and_the_report_only_with_debug(factories: str, tmp_path: Path) -> None:
    common = ["export", "--name", "m", "--out", str(tmp_path / "b"), "--factory", factories + "branches"]
    common += ["--input-size", "16x16", "--samples", "2", "--no-engines"]
    run = _cli(*common)
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("edgescope export: error: the model branches on tensor values at failing.py:9")
    debug = _cli("--debug", *common)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "GuardOnDataDependentSymNode" in debug.stderr
    assert debug.stderr.splitlines()[-1] == lines[0]


def test_the_cli_tells_a_tuple_model_to_pass_output(tmp_path: Path) -> None:
    factory = str(ROOT / "examples" / "families" / "models.py") + ":build_var_autoencoder"
    args = ["export", "--name", "vae", "--out", str(tmp_path / "vae"), "--factory", factory, "--task", "anomaly"]
    args += ["--output-name", "anomaly_map", "--labels", "", "--input-size", "64x64", "--samples", "2"]
    run = _cli(*args, "--no-engines")
    assert run.returncode == 2
    (line,) = run.stderr.splitlines()
    assert line.startswith("edgescope export: error: the model returns a tuple of 4")
    assert line.endswith("(e.g. --output 0)")


def test_export_flags_reach_the_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import edgescope.export as export_package

    requests: list[Any] = []
    monkeypatch.setattr(export_package, "export_model", lambda request: requests.append(request))
    base = ["export", "--name", "m", "--out", str(tmp_path / "m"), "--factory", "x.py:build"]
    assert main([*base, "--channels", "5", "--mean", "0.5", "--std", "0.1,0.2,0.3,0.4,0.5"]) == 0
    assert main([*base, "--output", "reconstruction, 2", "--static-batch", "--color", "rgb"]) == 0
    assert main(base) == 0
    features, chosen, plain = requests
    assert (features.color, features.channels, features.std) == ("channels", 5, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert (chosen.color, chosen.model_outputs, chosen.static_batch) == ("rgb", ("reconstruction", "2"), True)
    assert (plain.color, plain.channels, plain.model_outputs, plain.static_batch) == ("gray", 0, (), False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"color": "channels"}, "channel count from 1 to 256"),
        ({"color": "rgb", "channels": 5}, "--color rgb gives 3 channel"),
        ({"color": "channels", "channels": 5, "mean": [0.1, 0.2]}, "--mean has 2 values for a 5-channel input"),
        ({"color": "channels", "channels": 2, "std": [1.0, 0.0]}, "--std values must be positive"),
    ],
)
def test_channel_declarations_that_do_not_add_up_are_refused(fields: dict[str, Any], message: str) -> None:
    from edgescope.export.api import build_manifest

    with pytest.raises(ConfigError, match=message):
        build_manifest(ExportRequest(name="m", output=Path("unused"), **fields))
