"""The Dockerfile (no Docker engine here: it is parsed), its install steps, and the health probe.

The install the image runs must be the README's "GPU nodes" steps, which are the Makefile's
project install without the development extras; the HEALTHCHECK's probe is run against a real
server.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import tomllib

from server.app import LIVENESS_HEALTH_NAME
from server.config import ServerConfig
from tests.conftest import REPO_ROOT, ServerProcess

DEFAULTS = ServerConfig()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuations joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def _one(keyword: str) -> str:
    found = [args for kw, args in instructions() if kw == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def _normalise(command: str) -> list[str]:
    """A pip command as tokens, venv path and quiet flags removed."""
    tokens = shlex.split(command)
    tokens = ["pip" if t.endswith("/bin/pip") else t for t in tokens]
    if tokens[:3] == [".venv/bin/python", "-m", "pip"] or tokens[:3] == [
        "$(BIN)/python",
        "-m",
        "pip",
    ]:
        tokens = ["pip", *tokens[3:]]
    return [t for t in tokens if t not in ("--quiet", "--disable-pip-version-check")]


def _docker_install_steps() -> list[str]:
    steps = []
    for keyword, args in instructions():
        if keyword == "RUN" and "pip" in args:
            steps.extend(part.strip() for part in args.split("&&"))
    return steps


def _readme_gpu_steps() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("**GPU nodes.**") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "README's GPU nodes section has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_base_image_is_cuda_runtime() -> None:
    image = _one("FROM")
    assert image.startswith("nvidia/cuda:") and "runtime" in image


def test_runs_as_non_root_user() -> None:
    order = [kw for kw, _ in instructions()]
    user = _one("USER")
    assert user not in ("root", "0")
    assert any(kw == "RUN" and "useradd" in a and user in a for kw, a in instructions())
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_install_steps_are_the_readmes() -> None:
    docker = _docker_install_steps()
    assert docker == _readme_gpu_steps()
    pip = [_normalise(step) for step in docker if "pip" in step]
    # The project itself, as `make install` installs it (minus the development extras).
    makefile = (REPO_ROOT / "Makefile").read_text()
    make_install = next(
        line.strip() for line in makefile.splitlines() if "pip install" in line and "-e" in line
    )
    assert _normalise(make_install) == ["pip", "install", "-e", ".[dev]"]
    assert pip[0] == ["pip", "install", "-e", "."]
    # CUDA builds: onnxruntime-gpu replaces onnxruntime; triton at the project's pin.
    assert pip[1] == ["pip", "uninstall", "-y", "onnxruntime"]
    assert pip[2][:2] == ["pip", "install"]
    pins = dict(spec.split("==") for spec in pip[2][2:])
    assert set(pins) == {"onnxruntime-gpu", "triton"}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dev_pins = dict(s.split("==") for s in project["optional-dependencies"]["dev"] if "==" in s)
    assert pins["triton"] == dev_pins["triton"]
    assert "onnxruntime" in {s.split("==")[0] for s in project["dependencies"]}


def test_copies_every_package_and_the_model_store() -> None:
    copies = [args for kw, args in instructions() if kw == "COPY"]
    copied = {args.split()[-2].rstrip("/") for args in copies}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    assert "model_store" in copied and "pyproject.toml" not in packages
    store_copy = next(a for a in copies if "model_store" in a)
    # Where the entry point's --store points, so that a volume mounted there overrides it.
    entry = json.loads(_one("ENTRYPOINT"))
    store = entry[entry.index("--store") + 1]
    workdir = _one("WORKDIR")
    assert store == f"{workdir}/{store_copy.split()[-1].rstrip('/')}"


def test_ports_entrypoint_and_healthcheck() -> None:
    assert _one("EXPOSE").split() == [str(DEFAULTS.grpc.port), str(DEFAULTS.metrics.port)]
    entry = json.loads(_one("ENTRYPOINT"))  # exec form: a JSON array, so SIGTERM reaches it
    assert entry[1:2] == ["serve"] and entry[0].endswith("/flowserve")
    assert entry[entry.index("--port") + 1] == str(DEFAULTS.grpc.port)
    assert entry[entry.index("--metrics-port") + 1] == str(DEFAULTS.metrics.port)
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    health = _one("HEALTHCHECK")
    options, _, command = health.partition("CMD")
    probe = json.loads(command)
    assert probe[1:3] == ["-m", "server.healthprobe"]
    assert probe[3] == f"127.0.0.1:{DEFAULTS.grpc.port}"
    probe_timeout = float(probe[probe.index("--timeout") + 1])
    check_timeout = float(re.search(r"--timeout=(\d+)s", options).group(1))  # type: ignore[union-attr]
    assert probe_timeout < check_timeout


def _probe(*args: str) -> tuple[int, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "server.healthprobe", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode, time.monotonic() - start


def test_healthprobe_against_a_real_server(shared_server: ServerProcess) -> None:
    assert _probe(shared_server.target)[0] == 0
    assert _probe(shared_server.target, "--service", LIVENESS_HEALTH_NAME)[0] == 0
    # An unknown service name is NOT_FOUND: not serving.
    assert _probe(shared_server.target, "--service", "no.such.Service")[0] == 1


def test_healthprobe_fails_in_time_without_a_server() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: nothing answers
        code, seconds = _probe(f"127.0.0.1:{port}", "--timeout", "1")
    assert code == 1
    assert seconds < 30
