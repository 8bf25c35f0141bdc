"""TorchServe model archive (`.mar`) of a model directory, built with torch-model-archiver.

The archive holds `config.json`, `model.safetensors`, the handler file
`export/torchserve_handler.py` and a `model-config.yaml` (one worker, batch size 1). The
handler imports flowserve, so TorchServe must run in an environment where flowserve is
installed (`pip install -e .`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from flowserve.modeldir import CONFIG_FILE, WEIGHTS_FILE

HANDLER_FILE = Path(__file__).with_name("torchserve_handler.py")
ARCHIVER = "torch-model-archiver"
# One worker and no batching: each request is already a batch of samples.
_MODEL_CONFIG = "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nresponseTimeout: 120\n"


class ArchiverError(RuntimeError):
    """torch-model-archiver is missing or failed."""


def archiver_path() -> str | None:
    """The torch-model-archiver executable of this environment, or None."""
    beside_python = Path(sys.executable).with_name(ARCHIVER)
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which(ARCHIVER)


def build_mar(
    model_dir: str | os.PathLike[str], dest: str | os.PathLike[str], model_name: str
) -> dict[str, Any]:
    """Archive a model directory for TorchServe.

    Args:
        model_dir: The model directory; its name is used as the version when it is a number.
        dest: Output `.mar` path (overwritten).
        model_name: TorchServe model name.

    Returns:
        Facts for the manifest: archiver version, handler, archived files.

    Raises:
        ArchiverError: the archiver is not installed or failed (its stderr is in the message).
    """
    executable = archiver_path()
    if executable is None:
        raise ArchiverError(
            f"{ARCHIVER} is not installed (pip install torch-model-archiver==0.12.0)"
        )
    directory = Path(model_dir)
    version = directory.resolve().name if directory.resolve().name.isdigit() else "1"
    extra_files = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
    with tempfile.TemporaryDirectory(prefix="flowserve-mar-") as work:
        config_file = Path(work) / "model-config.yaml"
        config_file.write_text(_MODEL_CONFIG, encoding="utf-8")
        command = [
            executable,
            "--model-name",
            model_name,
            "--version",
            version,
            "--handler",
            str(HANDLER_FILE),
            "--extra-files",
            ",".join(str(path) for path in extra_files),
            "--config-file",
            str(config_file),
            "--export-path",
            work,
            "--force",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        archive = Path(work) / f"{model_name}.mar"
        if result.returncode != 0 or not archive.is_file():
            raise ArchiverError(
                f"{ARCHIVER} failed with exit code {result.returncode}: {result.stderr.strip()}"
            )
        shutil.copyfile(archive, dest)
    return {
        "archiver": ARCHIVER,
        "handler": HANDLER_FILE.name,
        "model_name": model_name,
        "version": version,
        "archived_files": [path.name for path in extra_files],
    }
