"""Regenerate the Python modules of the .proto files under protos/.

Run `python -m protos.build` after editing a .proto file and commit what it writes. protoc
names generated imports after the proto's path (`from flowserve.v1 import flowserve_pb2`),
which would resolve to the top-level `flowserve` package; `generate` rewrites them to
`protos.flowserve.v1` so the modules import the same way from anywhere.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent

# Proto files, relative to PROTO_ROOT; the directory is the proto package path.
PROTO_FILES: tuple[str, ...] = (
    "flowserve/v1/flowserve.proto",
    "inference/grpc_predict_v2.proto",
)

# Top-level proto directories whose generated imports get the `protos.` prefix.
_IMPORT_ROOTS = ("flowserve", "inference")
_IMPORT_PATTERN = re.compile(
    rf"^(from|import) ((?:{'|'.join(_IMPORT_ROOTS)})(?:\.\w+)*)( |$)", re.MULTILINE
)


# The module name protoc gives the generated classes (their `__module__`).
_MODULE_NAME_PATTERN = re.compile(
    rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')((?:{'|'.join(_IMPORT_ROOTS)})\.)"
)


def _fix_imports(text: str) -> str:
    """Prefix generated imports and module names of sibling proto modules with `protos.`."""
    text = _IMPORT_PATTERN.sub(lambda m: f"{m.group(1)} protos.{m.group(2)}{m.group(3)}", text)
    return _MODULE_NAME_PATTERN.sub(lambda m: f"{m.group(1)}protos.{m.group(2)}", text)


def generated_files(proto: str) -> tuple[str, ...]:
    """The generated module paths (relative to the protos root) of one proto file."""
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto in PROTO_FILES, writing modules under `out_dir`.

    Args:
        out_dir: Root of the output tree; `flowserve/v1/flowserve_pb2.py` etc. land under it.

    Returns:
        The paths written, relative to `out_dir`.

    Raises:
        RuntimeError: protoc failed (its message is on stderr).
    """
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={raw_dir}",
            f"--pyi_out={raw_dir}",
            f"--grpc_python_out={raw_dir}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)}")
        written: list[Path] = []
        for proto in PROTO_FILES:
            for rel in generated_files(proto):
                text = (raw_dir / rel).read_text(encoding="utf-8")
                dest = out_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(_fix_imports(text), encoding="utf-8")
                written.append(Path(rel))
    return written


def main() -> None:
    """Regenerate the committed modules in place."""
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        for rel in written:
            shutil.copyfile(Path(tmp) / rel, PROTO_ROOT / rel)
            print(f"wrote protos/{rel}")


if __name__ == "__main__":
    main()
    sys.exit(0)
