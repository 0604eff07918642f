"""Generate the Python gRPC stubs for every .proto under protos/.

Usage: python protos/generate.py [--out DIR]

Writes DIR/protos/<path>/<name>_pb2.py, _pb2.pyi and _pb2_grpc.py for each
protos/<path>/<name>.proto. DIR defaults to the repository root, i.e. the stubs land
beside their .proto files, where they are committed. `make protos` and
tests/protos/test_stubs.py both run this script, so this is the one place the
protoc command is written.

protoc runs from the repository root with `-I .`, so a proto's import path is
`protos/lockstep/v1/lockstep.proto` and the generated stubs import each other as
`from protos.lockstep.v1 import lockstep_pb2`. (With `-I protos` they would say
`from lockstep.v1 import ...`, which does not import in this layout.) The
consequence: a proto that imports another writes `import "protos/lockstep/v1/x.proto";`.
The stubs depend only on the proto text and the grpcio-tools version (pinned in
constraints.txt), not on where or when this runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS_DIR = "protos"


def proto_files() -> list[str]:
    """Repo-relative paths of every .proto under protos/, sorted (stable order)."""
    root = REPO_ROOT / PROTOS_DIR
    return sorted(p.relative_to(REPO_ROOT).as_posix() for p in root.rglob("*.proto"))


def protoc_command(out_dir: Path) -> list[str]:
    """The protoc invocation; run it with cwd=REPO_ROOT."""
    out = str(out_dir)
    return [
        sys.executable, "-m", "grpc_tools.protoc",
        "-I", ".",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
        *proto_files(),
    ]


def generate(out_dir: Path = REPO_ROOT) -> None:
    """Write the stubs under out_dir/protos/...; raises CalledProcessError on failure."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(protoc_command(out_dir), cwd=REPO_ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT,
        help="root to write protos/... under (default: the repository root)",
    )
    args = parser.parse_args(argv)
    try:
        generate(args.out)
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
