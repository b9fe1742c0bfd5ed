"""Regenerate the checked-in Python stubs from ``proto/`` (``make proto`` / ``python -m polyhead.protogen``).

The stubs live in ``polyhead/v1`` so that protoc's import paths (``polyhead.v1.types_pb2``) match the proto
package. A test runs :func:`generate` into a temporary directory and fails when the checked-in files drift.
Needs the ``dev`` extra (grpcio-tools).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
STUB_DIR = REPO_ROOT / "polyhead" / "v1"


def proto_files() -> list[Path]:
    """Every .proto of the contract, sorted (stable generation order)."""
    return sorted((PROTO_ROOT / "polyhead" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every proto file, writing ``polyhead/v1/*_pb2*.py(i)`` under ``out_root``.

    Returns the generated files. Raises RuntimeError with protoc's exit status on failure.
    """
    import importlib.resources

    from grpc_tools import protoc  # dev-only dependency

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}: {' '.join(args)}")
    return sorted((out_root / "polyhead" / "v1").glob("*_pb2*"))


def main() -> int:
    generated = generate(REPO_ROOT)
    for path in generated:
        print(path.relative_to(REPO_ROOT), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
