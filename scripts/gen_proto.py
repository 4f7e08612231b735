"""Regenerate the checked-in Python code for proto/ (run by `make proto`)."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def _protoc(*args: str) -> None:
    if protoc.main(["grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", *args]) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(out_dir: Path) -> None:
    """Write *_pb2.py/.pyi for every .proto, and *_pb2_grpc.py/.pyi for those with services."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    names = [str(p.relative_to(PROTO_ROOT)) for p in protos]
    with_services = [str(p.relative_to(PROTO_ROOT)) for p in protos if "\nservice " in p.read_text(encoding="utf-8")]
    _protoc(f"--python_out={out_dir}", f"--mypy_out=quiet:{out_dir}", *names)
    _protoc(f"--grpc_python_out={out_dir}", f"--mypy_grpc_out=quiet:{out_dir}", *with_services)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
