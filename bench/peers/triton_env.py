"""The Triton peer's own virtual environment: `<repo>/.bench-venvs/pytriton`.

PyTriton runs its model callable in a Python-backend stub that links the system's
`libpython3.11.so.1.0` (Debian's 3.11.2 here) through the dynamic loader. A process whose
interpreter is another 3.11 build (pyenv's 3.11.7, the main venv's) then runs two patch levels at
once and fails in multiprocessing (`_recursion_count`). So the peer gets a venv of the very
interpreter whose shared library the loader finds, with the pins of `triton_requirements.txt`
(PyTriton also needs numpy < 2, which the main venv does not have).

The venv is built once; a stamp file records the hash of the requirements and the interpreter,
and any change rebuilds it from scratch. A lock file serialises concurrent builders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("triton_requirements.txt")
VENV_DIR = Path(".bench-venvs") / "pytriton"
STAMP_FILE = ".flowserve-requirements.json"
INSTALL_LOG = "pip-install.log"
PREFERRED_PYTHON = Path("/usr/bin/python3.11")
PYTHON_VERSION = (3, 11)
# A cold install downloads and unpacks about 1 GB (torch, Triton) from the local indexes.
INSTALL_TIMEOUT_S = 1800.0
PROBE_TIMEOUT_S = 30.0

# Run by the candidate interpreter: its version and where its shared libpython lives.
_PROBE = """
import json, sys, sysconfig
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "soname": sysconfig.get_config_var("INSTSONAME"),
    "shared": sysconfig.get_config_var("Py_ENABLE_SHARED"),
}))
"""


class TritonEnvError(RuntimeError):
    """No suitable interpreter, or the peer venv could not be built."""


@dataclass(frozen=True)
class Interpreter:
    """A candidate interpreter for the peer venv.

    Attributes:
        path: The executable.
        version: `(major, minor, micro)`.
        library: Its shared libpython (`LIBDIR/INSTSONAME`), resolved, if it names one.
    """

    path: Path
    version: tuple[int, int, int]
    library: Path | None

    @property
    def version_text(self) -> str:
        """`3.11.2`."""
        return ".".join(str(part) for part in self.version)


def _probe(path: Path) -> Interpreter:
    """Ask an interpreter for its version and shared library."""
    try:
        result = subprocess.run(
            [str(path), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=True,
        )
        info = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as error:
        raise TritonEnvError(f"{path}: cannot run it to read its version ({error})") from error
    library = None
    if info["libdir"] and info["soname"]:
        library = (Path(info["libdir"]) / info["soname"]).resolve()
    major, minor, micro = (int(part) for part in info["version"])
    return Interpreter(path=path, version=(major, minor, micro), library=library)


def _loader_libpython(soname: str) -> Path | None:
    """Where the dynamic loader finds `soname` (as the stub will), or None if unknown."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        name, _, target = line.strip().partition(" => ")
        # "libpython3.11.so.1.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libpython3.11.so.1.0"
        if name.split(" ", 1)[0] == soname and target:
            return Path(target).resolve()
    return None


def _candidates() -> list[Path]:
    """Interpreters to try: Debian's first, then whatever `python3.11` is on PATH."""
    found = [PREFERRED_PYTHON] if os.access(PREFERRED_PYTHON, os.X_OK) else []
    on_path = shutil.which(f"python{PYTHON_VERSION[0]}.{PYTHON_VERSION[1]}")
    if on_path is not None and Path(on_path).resolve() not in {p.resolve() for p in found}:
        found.append(Path(on_path))
    return found


def find_python() -> Interpreter:
    """The interpreter for the peer venv: Python 3.11 whose libpython the loader resolves.

    Raises:
        TritonEnvError: no candidate qualifies; the message lists each one and why.
    """
    reasons: list[str] = []
    for path in _candidates():
        try:
            interpreter = _probe(path)
        except TritonEnvError as error:
            reasons.append(str(error))
            continue
        if interpreter.version[:2] != PYTHON_VERSION:
            reasons.append(f"{path}: Python {interpreter.version_text}, not 3.11")
            continue
        soname = interpreter.library.name if interpreter.library else "libpython3.11.so.1.0"
        system = _loader_libpython(soname)
        if system is not None and interpreter.library != system:
            # The stub would load `system`: a different build from this interpreter.
            reasons.append(
                f"{path}: Python {interpreter.version_text} with libpython at "
                f"{interpreter.library}, but the Triton stub loads {system}"
            )
            continue
        return interpreter
    detail = "; ".join(reasons) or "no python3.11 found (tried /usr/bin/python3.11 and PATH)"
    raise TritonEnvError(
        "the Triton peer needs the system Python 3.11 whose libpython3.11.so the PyTriton stub "
        f"links (Debian: apt-get install python3.11 python3.11-venv libpython3.11): {detail}"
    )


def _stamp(interpreter: Interpreter) -> dict[str, str]:
    """What the venv was built from; any difference means a rebuild."""
    return {
        "requirements_sha256": hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest(),
        "python": str(interpreter.path),
        "python_version": interpreter.version_text,
    }


def _read_stamp(venv: Path) -> dict[str, str] | None:
    try:
        data = json.loads((venv / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _build(venv: Path, interpreter: Interpreter, stamp: dict[str, str]) -> None:
    """Create the venv from scratch and install the pinned requirements."""
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [str(interpreter.path), "-m", "venv", str(venv)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S * 4,
            check=True,
        )
    except subprocess.CalledProcessError as error:
        raise TritonEnvError(
            f"{interpreter.path} -m venv {venv} failed (Debian needs python3.11-venv): "
            f"{error.stderr.strip()[-2000:]}"
        ) from error
    log = venv / INSTALL_LOG
    python = venv / "bin" / "python"
    command = [
        str(python),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-r",
        str(REQUIREMENTS),
    ]
    with log.open("w", encoding="utf-8") as handle:
        try:
            subprocess.run(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=INSTALL_TIMEOUT_S,
                check=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise TritonEnvError(
                f"installing {REQUIREMENTS.name} into {venv} failed ({error}); "
                f"log {log}, last lines:\n{_log_tail(log)}"
            ) from error
    # Written last: an interrupted build has no stamp and is rebuilt next time.
    (venv / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


def ensure_venv(root: Path) -> Path:
    """Build the peer venv under `root` unless an up-to-date one is there; return its python.

    Args:
        root: The repository root; the venv lives in `root/.bench-venvs/pytriton` (git-ignored).

    Returns:
        The venv's `bin/python`.

    Raises:
        TritonEnvError: no suitable Python 3.11, or the venv or the install failed.
    """
    venv = (root / VENV_DIR).resolve()
    python = venv / "bin" / "python"
    interpreter = find_python()
    stamp = _stamp(interpreter)
    if _read_stamp(venv) == stamp and python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        # Blocks while another process builds; then its stamp usually makes this a no-op.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_stamp(venv) == stamp and python.exists():
            return python
        print(
            f"bench: building the Triton peer venv {venv} with {interpreter.path} "
            f"(Python {interpreter.version_text}) from {REQUIREMENTS.name}; one-off, "
            "about a minute (pip log in the venv)...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        _build(venv, interpreter, stamp)
        print(
            f"bench: Triton peer venv ready in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return python
