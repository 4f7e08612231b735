"""The end-to-end demo: serve a bundle on loopback, stream a source, summarise.

Starts ``edgescope serve`` as a child process on a free 127.0.0.1 port, waits
until its gRPC health check says SERVING, streams the source at its native
rate, writes the overlay video and the latency summary, then stops the
server it started (SIGTERM to that process id) and waits for it to exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.sources.merged import describe_sources, named_sources, open_sources

STARTUP_TIMEOUT_S = 60.0


def wait_until_serving(target: str, server: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll the health service until SERVING; fail early if the server exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the server at {target} was not SERVING after {timeout_s:.0f} s")


def start_server(
    bundles: list[Path],
    port_file: Path,
    extra: list[str] | None = None,
    log: Path | None = None,
    python: str = sys.executable,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``edgescope serve`` on an OS-chosen loopback port; return it and its target.

    With ``log``, the server's output goes to that file instead of this process's; ``python``
    is the interpreter whose edgescope serves (another installed version, for a comparison).
    """
    command = [
        python,
        "-m",
        "edgescope.cli",
        "serve",
        *map(str, bundles),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        # The dashboard and /metrics on any free port too, so several servers can run side by side.
        "--metrics-port",
        "0",
        *(extra or []),
    ]
    if log is None:
        server = subprocess.Popen(command)
    else:
        with log.open("wb") as output:
            server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (port_file.exists() and port_file.read_text().strip()):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError("the server did not start (see its log above)")
        time.sleep(0.1)
    target = f"127.0.0.1:{port_file.read_text().strip()}"
    wait_until_serving(target, server, STARTUP_TIMEOUT_S)
    return server, target


def stop_server(server: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--source", required=True, action="append", help="SPEC, or NAME=SPEC for each of several")
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args()

    named = named_sources(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        server, target = start_server([args.bundle], Path(tmp) / "port")
        try:
            with open_sources(named) as source:
                print(f"streaming {describe_sources(named)} at {source.fps:.1f} fps to {target}")
                report = asyncio.run(stream_source(source, StreamOptions(target=target, model="", save=args.save)))
        finally:
            stop_server(server)
    print(report.latency.format_table())
    if report.sources is not None:
        print(report.sources.format_line())
    summary = {
        "source": describe_sources(named),
        "bundle": str(args.bundle),
        "sent": report.sent,
        **report.latency.as_dict(),
        **(report.sources.as_dict() if report.sources is not None else {}),
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"overlay video: {args.save}\nsummary: {args.summary}")
    # Frames of several sources left without a partner are answered as such by design; any other drop fails.
    unexpected = report.latency.dropped - report.latency.drops.get("unpaired", 0)
    return 0 if report.latency.errors == 0 and unexpected == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
