"""Container health check: exit 0 when edgescope's gRPC health service reports SERVING.

Used by the images' HEALTHCHECK, the compose file and the Helm chart's exec
probes (Kubernetes' own gRPC probe cannot speak TLS). Plain text unless
``--tls-ca`` is given; with TLS, ``--server-name`` is a name the server's
certificate holds (the check connects to 127.0.0.1). A token, when the server
asks for one, comes from ``--token-file`` or ``EDGESCOPE_TOKEN``.

    python healthcheck.py [--target 127.0.0.1:8731] [--tls-ca CA --server-name NAME]
                          [--tls-cert CERT --tls-key KEY] [--token-file FILE] [--timeout 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.target)
    client_key = Path(args.tls_key).read_bytes() if args.tls_key else None
    client_cert = Path(args.tls_cert).read_bytes() if args.tls_cert else None
    credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes(), client_key, client_cert)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--target", default="127.0.0.1:8731")
    parser.add_argument("--tls-ca", help="trust this CA (turns TLS on)")
    parser.add_argument("--server-name", help="a name in the server's certificate")
    parser.add_argument("--tls-cert", help="client certificate, when the server requires one (mTLS)")
    parser.add_argument("--tls-key", help="client key for --tls-cert")
    parser.add_argument("--token-file", help="a file holding one token")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("EDGESCOPE_TOKEN", "")
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        with _channel(args) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout, metadata=metadata
            )
    except (grpc.RpcError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
