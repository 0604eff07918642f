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

The exception: protos/inference/ holds the KServe v2 / Triton protocol's files as
published (triton-inference-server/common, protobuf/), compiled with `-I protos/inference`
under their published names ("grpc_service.proto" imports "model_config.proto"), exactly
as Triton builds tritonclient's stubs. A descriptor pool takes the same file twice when it
is byte-identical, so a process may hold both ours and tritonclient's (a test or a bench
that runs the server and its client); under any other name the second import fails with
"duplicate symbol". protoc then writes the stubs' imports as top-level modules
(`import model_config_pb2`), which are rewritten to package paths here, as tritonclient's
build does for its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS_DIR = "protos"
PUBLISHED = "protos/inference"  # compiled under their published file names (see above)
# protoc's top-level imports in the published stubs -> package imports.
_IMPORT_FIXES = (("import model_config_pb2 as", "from protos.inference import model_config_pb2 as"),
                 ("import grpc_service_pb2 as", "from protos.inference import grpc_service_pb2 as"))


def proto_files(published: bool = False) -> list[str]:
    """Repo-relative paths of the .proto files under protos/ (published: those under
    PUBLISHED; else the others), sorted (stable order)."""
    root = REPO_ROOT / PROTOS_DIR
    paths = sorted(p.relative_to(REPO_ROOT).as_posix() for p in root.rglob("*.proto"))
    return [p for p in paths if p.startswith(PUBLISHED + "/") == published]


def protoc_command(out_dir: Path, published: bool = False) -> list[str]:
    """One protoc invocation; run it with cwd=REPO_ROOT. `published`: the files under
    PUBLISHED, by their own names, into out_dir/PUBLISHED."""
    out = str(out_dir / PUBLISHED) if published else str(out_dir)
    files = proto_files(published)
    if published:
        files = [Path(f).relative_to(PUBLISHED).as_posix() for f in files]
    return [
        sys.executable, "-m", "grpc_tools.protoc",
        "-I", PUBLISHED if published else ".",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
        *files,
    ]


def generate(out_dir: Path = REPO_ROOT) -> None:
    """Write the stubs under out_dir/protos/...; raises CalledProcessError on failure."""
    out_dir = Path(out_dir).resolve()
    (out_dir / PUBLISHED).mkdir(parents=True, exist_ok=True)
    subprocess.run(protoc_command(out_dir), cwd=REPO_ROOT, check=True)
    subprocess.run(protoc_command(out_dir, published=True), cwd=REPO_ROOT, check=True)
    for stub in sorted((out_dir / PUBLISHED).glob("*_pb2*.py*")):
        text = stub.read_text()
        for old, new in _IMPORT_FIXES:
            text = text.replace(old, new)
        stub.write_text(text)


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
