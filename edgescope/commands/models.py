"""``edgescope models``: the models a server has loaded."""

from __future__ import annotations

import argparse

from edgescope.commands.options import DEFAULT_TARGET, add_client_security, client_security


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("models", help="list the models a server has loaded")
    p.add_argument("--target", default=DEFAULT_TARGET)
    add_client_security(p)


def run(args: argparse.Namespace) -> int:
    from edgescope.runtime.transport import sync_channel
    from edgescope.v1 import manifest_pb2, stream_pb2, stream_pb2_grpc

    with sync_channel(args.target, client_security(args)) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        response = stub.ListModels(stream_pb2.ListModelsRequest(), timeout=10)
    for model in response.models:
        if not model.ready:
            print(f"{model.name}\tNOT SERVED\t{model.not_ready_reason}")
            continue
        gate = "passed" if model.manifest.validation.passed else "FAILED"
        task = manifest_pb2.Task.Name(model.manifest.task)
        state = f"DEGRADED ({model.provenance.degraded_reason})" if model.provenance.degraded else "serving"
        print(f"{model.name}\t{model.manifest.version}\t{task}\t{model.backend}\tgate {gate}\t{state}")
    return 0
