"""`edgescope serve` options from a TOML or YAML file and EDGESCOPE_* variables, under the flags."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgescope.bundle import Bundle
from edgescope.cli import build_parser, command_parser
from edgescope.config import apply_config, options_of
from edgescope.errors import ConfigError

TOML = """
bundles = ["b1", "b2"]
port = 9001
max-batch = 4
policy = "live"
allow_failed_validation = true
latency-budget-ms = ["lesion-unet=40", 30]
batch_delay_ms = 2
"""
YAML = """
bundles: [b1, b2]
port: 9001
max-batch: 4
policy: live
allow_failed_validation: true
latency-budget-ms: ["lesion-unet=40", 30]
batch_delay_ms: 2
"""


def _serve(
    tmp_path: Path, argv: list[str], text: str = "", suffix: str = ".toml", env: dict[str, str] | None = None
) -> argparse.Namespace:
    parser = build_parser()
    config = None
    if text:
        config = tmp_path / f"serve{suffix}"
        config.write_text(text, encoding="utf-8")
    full = ["serve", *argv]
    return apply_config(parser.parse_args(full), parser, command_parser(parser, "serve"), full, config, env or {})


@pytest.mark.parametrize(("text", "suffix"), [(TOML, ".toml"), (YAML, ".yaml")])
def test_a_file_sets_options_with_their_types(tmp_path: Path, text: str, suffix: str) -> None:
    args = _serve(tmp_path, [], text, suffix)
    assert args.bundles == [Path("b1"), Path("b2")]
    assert (args.port, args.max_batch, args.policy, args.allow_failed_validation) == (9001, 4, "live", True)
    # Parsed as the flag would be: a bare number budgets every model.
    assert args.latency_budget_ms == [("lesion-unet", 40.0), ("*", 30.0)]
    assert args.batch_delay_ms == 2.0 and isinstance(args.batch_delay_ms, float)
    # Options the file leaves out keep their defaults.
    defaults = build_parser().parse_args(["serve", "b"])
    assert (args.host, args.metrics_port) == (defaults.host, defaults.metrics_port)


def test_flags_override_the_environment_which_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "EDGESCOPE_PORT": "9002",
        "EDGESCOPE_MAX_BATCH": "2",
        "EDGESCOPE_POLICY": "every",
        "EDGESCOPE_BUNDLES": "e1,e2",
    }
    args = _serve(tmp_path, ["--max-batch", "8", "f1"], TOML, env=env)
    assert args.port == 9002  # environment over file
    assert args.max_batch == 8  # a flag wins even when it repeats the default
    assert args.policy == "every"
    assert args.bundles == [Path("f1")]
    assert args.allow_failed_validation is True  # only the file sets it


def test_environment_switches_and_lists(tmp_path: Path) -> None:
    env = {
        "EDGESCOPE_ALLOW_FAILED_VALIDATION": "off",
        "EDGESCOPE_CAPTURE": "probe=synthetic:ultrasound@m, cart=synthetic:endoscopy@m",
        # Variables that are not serve options (a client's token) are not the config's business.
        "EDGESCOPE_TOKEN": "secret",
    }
    args = _serve(tmp_path, ["b"], TOML, env=env)
    assert args.allow_failed_validation is False
    assert args.capture == ["probe=synthetic:ultrasound@m", "cart=synthetic:endoscopy@m"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 9001\n", "unknown key 'prot'; did you mean 'port'"),
        ('port = "9001"\n', "'port' must be an integer, not '9001' (str)"),
        ("port = 9001.5\n", "'port' must be an integer"),
        ("batch_delay_ms = true\n", "'batch_delay_ms' must be a number, not True (bool)"),
        ('allow-failed-validation = "yes"\n', "'allow_failed_validation' is a switch: use true or false"),
        ('policy = "sometimes"\n', "'policy' must be one of every, live, not 'sometimes'"),
        ("host = [1, 2]\n", "'host' takes one value, not a list"),
        ('latency_budget_ms = ["fast"]\n', "'latency_budget_ms' could not be read: 'fast'"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_an_error_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"serve\.toml") as raised:
        _serve(tmp_path, ["b"], text)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGESCOPE_PORT": "http"}, "EDGESCOPE_PORT: 'port' must be an integer: 'http'"),
        ({"EDGESCOPE_INSECURE_FLAG_THAT_IS_NOT": "1", "EDGESCOPE_POLICY": "x"}, "'policy' must be one of"),
        ({"EDGESCOPE_ALLOW_FAILED_VALIDATION": "maybe"}, "EDGESCOPE_ALLOW_FAILED_VALIDATION is a switch"),
    ],
)
def test_a_bad_variable_is_an_error_naming_it(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _serve(tmp_path, ["b"], env=env)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [("serve.ini", "port = 1", "name it .toml, .yaml or .yml"), ("serve.yaml", "- 1\n- 2\n", "a table of options")],
)
def test_files_that_are_not_an_options_table(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    parser = build_parser()
    args = parser.parse_args(["serve", "b"])
    with pytest.raises(ConfigError, match=message):
        apply_config(args, parser, command_parser(parser, "serve"), ["serve", "b"], path, {})
    with pytest.raises(ConfigError, match="cannot read config file"):
        apply_config(args, parser, command_parser(parser, "serve"), ["serve", "b"], tmp_path / "none.toml", {})


def test_an_option_added_to_the_parser_is_a_key_and_a_variable(tmp_path: Path) -> None:
    parser = build_parser()
    serve = command_parser(parser, "serve")
    serve.add_argument("--made-up-limit", type=int, default=3)
    serve.add_argument("--made-up-switch", action=argparse.BooleanOptionalAction, default=True)
    path = tmp_path / "serve.yaml"
    path.write_text("made-up-limit: 5\nmade-up-switch: false\n", encoding="utf-8")
    args = parser.parse_args(["serve", "b"])
    merged = apply_config(args, parser, serve, ["serve", "b"], path, {})
    assert (merged.made_up_limit, merged.made_up_switch) == (5, False)
    merged = apply_config(args, parser, serve, ["serve", "b"], path, {"EDGESCOPE_MADE_UP_LIMIT": "6"})
    assert merged.made_up_limit == 6
    path.write_text("made-up-limit: five\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'made_up_limit' must be an integer"):
        apply_config(args, parser, serve, ["serve", "b"], path, {})


def test_every_serve_option_round_trips_through_a_variable(tmp_path: Path) -> None:
    parser = build_parser()
    defaults = parser.parse_args(["serve", "b"])
    for key, option in options_of(command_parser(parser, "serve"), skip=("config",)).items():
        value: Any = getattr(defaults, key)
        if value is None or option.is_list:
            continue
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        args = _serve(tmp_path, ["b"], env={option.env: text})
        assert getattr(args, key) == value, key


def _wait_for_port(port_file: Path, server: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        assert server.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    return int(port_file.read_text())


def test_serve_runs_from_a_config_file_and_the_environment(example_bundle: Bundle, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    config = tmp_path / "device.yaml"
    config.write_text(f"bundles: ['{example_bundle.path}']\nhost: 127.0.0.1\nport: 0\nmetrics-port: -1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESCOPE_")}
    env["EDGESCOPE_PORT_FILE"] = str(port_file)
    command = [sys.executable, "-m", "edgescope.cli", "serve", "--config", str(config)]
    server = subprocess.Popen(command, env=env)
    try:
        port = _wait_for_port(port_file, server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0


def test_a_config_error_is_one_line_that_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "device.toml"
    config.write_text('port = "8731"\n')
    command = [sys.executable, "-m", "edgescope.cli", "serve", "--config", str(config)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith(f"edgescope serve: error: config file {config}: 'port' must be an integer")
    assert "Traceback" not in run.stderr
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True, timeout=60)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_serve_without_a_bundle_says_where_to_give_one() -> None:
    run = subprocess.run([sys.executable, "-m", "edgescope.cli", "serve"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "no bundle to serve" in run.stderr and "EDGESCOPE_BUNDLES" in run.stderr


@pytest.mark.parametrize(
    ("flags", "expected"), [(["--intra-op-spinning", "off"], "0"), (["--intra-op-spinning", "on"], "1")]
)
def test_onnxruntime_threads_spin_only_when_asked(example_bundle: Bundle, flags: list[str], expected: str) -> None:
    from edgescope.cli import _backend

    args = build_parser().parse_args(["serve", str(example_bundle.path), *flags])
    session = _backend("onnxruntime", args).load(example_bundle)
    try:
        options = session._session.get_session_options()  # type: ignore[attr-defined]
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected
        # Never between runs: the cores belong to the rest of the frame's work there.
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    finally:
        session.close()
