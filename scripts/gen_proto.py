"""Regenerate the checked-in Python code for proto/ (run by `make proto`).

The Open Inference Protocol files (package ``inference``) are registered in
edgescope's own descriptor pool, not protobuf's default one: tritonclient
defines the same names there, and one pool refuses a second definition.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PRIVATE_POOL_DIR = Path("edgescope/kserve")
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_KSERVE_POOL.AddSerializedFile("
POOL_IMPORT = "from edgescope.kserve import POOL as _KSERVE_POOL\n"
IMPORTS_END = "# @@protoc_insertion_point(imports)\n"


def _protoc(*args: str) -> None:
    if protoc.main(["grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", *args]) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def _use_private_pool(module: Path) -> None:
    text = module.read_text(encoding="utf-8")
    if text.count(DEFAULT_POOL) != 1 or text.count(IMPORTS_END) != 1:
        raise SystemExit(f"{module}: protoc's output changed shape; update scripts/gen_proto.py")
    text = text.replace(DEFAULT_POOL, PRIVATE_POOL).replace(IMPORTS_END, POOL_IMPORT + IMPORTS_END)
    module.write_text(text, encoding="utf-8")


def generate(out_dir: Path) -> None:
    """Write *_pb2.py/.pyi for every .proto, and *_pb2_grpc.py/.pyi for those with services."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    names = [str(p.relative_to(PROTO_ROOT)) for p in protos]
    with_services = [str(p.relative_to(PROTO_ROOT)) for p in protos if "\nservice " in p.read_text(encoding="utf-8")]
    _protoc(f"--python_out={out_dir}", f"--mypy_out=quiet:{out_dir}", *names)
    _protoc(f"--grpc_python_out={out_dir}", f"--mypy_grpc_out=quiet:{out_dir}", *with_services)
    for module in sorted((out_dir / PRIVATE_POOL_DIR).rglob("*_pb2.py")):
        _use_private_pool(module)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
