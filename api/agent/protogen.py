"""Generate the Python modules of the agent protocol from `v1/agent.proto`.

The generated modules are checked in (so that installing Tessera needs no protoc) and a test
regenerates them and compares, so they cannot drift from the .proto. protoc writes imports
that follow the proto's path under its include root, so the proto is copied into a temporary
tree at `tessera/api/agent/v1/` first: the generated gRPC module then imports
`from tessera.api.agent.v1 import agent_pb2`, which is where it lives once installed.

Run `python -m tessera.api.agent.protogen` after editing the .proto.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "v1"
PROTO_NAME = "agent.proto"
PACKAGE_PATH = Path("tessera/api/agent/v1")
GENERATED_NAMES = ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py")
MYPY_HEADER = "# mypy: ignore-errors\n"


class ProtoGenerationError(RuntimeError):
    """protoc failed or wrote something other than the expected modules."""


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc (from grpcio-tools) on agent.proto; return {file name: generated text}."""
    try:
        import grpc_tools
    except ImportError as error:  # pragma: no cover - grpcio-tools is a dev dependency
        raise ProtoGenerationError(
            "grpcio-tools is needed to generate the agent protocol: pip install grpcio-tools"
        ) from error
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        (root / PACKAGE_PATH).mkdir(parents=True)
        shutil.copyfile(PROTO_DIR / PROTO_NAME, root / PACKAGE_PATH / PROTO_NAME)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        # A child process, so that protoc's messages can be put into the exception.
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{root}",
                f"-I{well_known}",
                f"--python_out={gen}",
                f"--pyi_out={gen}",
                f"--grpc_python_out={gen}",
                str(PACKAGE_PATH / PROTO_NAME),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if status.returncode != 0:
            raise ProtoGenerationError(f"protoc failed on {PROTO_NAME}: {status.stderr.strip()}")
        texts = {name: (gen / PACKAGE_PATH / name).read_text() for name in GENERATED_NAMES}
    # grpc_tools writes the service module without type annotations; mypy follows imports into
    # it (its exclude list does not stop that), so it is marked as unchecked here.
    texts["agent_pb2_grpc.py"] = MYPY_HEADER + texts["agent_pb2_grpc.py"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    return texts


def main() -> int:
    generate(PROTO_DIR)
    print(f"regenerated {', '.join(GENERATED_NAMES)} in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
