"""Model lifecycle against a real server process over real channels: push, validation,
promotion under load, pins and rollback, restart, and directory mode.

The truth each test checks is independent of the server's own view: the files on disk
(listing + sha256 of the whole store before and after a rejected push), the versions named in
Sample responses seen by a real client, and the pin file a restart reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from flows.nets import NetSpec
from flowserve.modeldir import ModelConfig, build_net, sha256_file, write_model_dir
from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from server.push_client import admin_metadata, admin_stub, push_chunks
from tests.conftest import REPO_ROOT, ServerProcess, poll_until

Code = grpc.StatusCode
TOKEN = "push-test-token-0123456789"
TIMEOUT = 60.0
# Directory mode polls every 0.3 s; a dropped directory must be served within this bound.
POLL_SECONDS = 0.3
ADOPT_TIMEOUT_SECONDS = 30.0
# The per-file push limit of the test server: above the ~0.8 MB default moons model.
MAX_FILE_BYTES = 1_500_000

SPEC = NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2})


def model_config(name: str, dataset: str | None = None) -> ModelConfig:
    """A tiny unconditional 2-D velocity model."""
    return ModelConfig(
        name=name,
        architecture=SPEC,
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="euler",
        default_num_steps=4,
        dataset=dataset,
    )


def state_dict(seed: int, spec: NetSpec = SPEC) -> dict[str, torch.Tensor]:
    """Random-init weights of `spec`, fixed by `seed`."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_net(spec).state_dict().items()}


def write_dir(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor]) -> Path:
    """A valid model directory (written and verified by flowserve.modeldir)."""
    write_model_dir(path, config, weights)
    return path


def replace_weights(directory: Path, weights: dict[str, torch.Tensor] | bytes) -> None:
    """Swap the weights file and record its new sha256, so that only the content is wrong."""
    path = directory / "model.safetensors"
    if isinstance(weights, bytes):
        path.write_bytes(weights)
    else:
        save_file(weights, str(path))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["sha256"]["model.safetensors"] = sha256_file(path)
    config_path.write_text(json.dumps(config))


def store_snapshot(root: Path) -> dict[str, str]:
    """Every path under the store with the sha256 of files ("dir" for directories)."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        )
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("push_store")
    write_dir(root / "pushy" / "1", model_config("pushy"), state_dict(1))
    write_dir(root / "gated" / "1", model_config("gated", dataset="moons"), state_dict(2))
    return root


@pytest.fixture(scope="module")
def server_args(store: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("push_server")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    config = directory / "flowserve.toml"
    config.write_text(
        "torch_threads = 1\n"
        f"[store]\npoll_seconds = {POLL_SECONDS}\n"
        f"[push]\nmax_file_bytes = {MAX_FILE_BYTES}\nquality_samples = 256\n"
        "[grpc]\nmax_workers = 32\n"
    )
    return [
        "--store",
        str(store),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--config",
        str(config),
        "--admin-token-file",
        str(token_file),
    ]


@pytest.fixture(scope="module")
def server(
    server_args: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = ServerProcess(server_args, tmp_path_factory.mktemp("push_log") / "server.log")
    process.wait_for_line("flowserve ready")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as open_channel:
        grpc.channel_ready_future(open_channel).result(timeout=TIMEOUT)
        yield open_channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GeneratorStub:
    return pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> pb_grpc.ModelAdminStub:
    return admin_stub(channel)


def push(
    admin: pb_grpc.ModelAdminStub,
    chunks: Iterator[pb.PushModelChunk] | list[pb.PushModelChunk],
    token: str | None = TOKEN,
) -> pb.PushModelResponse:
    metadata = admin_metadata(token) if token is not None else ()
    response: pb.PushModelResponse = admin.PushModel(
        iter(chunks), metadata=metadata, timeout=TIMEOUT
    )
    return response


def serving_version(stub: pb_grpc.GeneratorStub, name: str) -> int:
    info = stub.GetModel(pb.GetModelRequest(model=name), timeout=TIMEOUT)
    return int(info.serving_version)


# Every wait is bounded; the shared helper names what it waited for when it gives up.
poll = partial(poll_until, timeout=ADOPT_TIMEOUT_SECONDS)


def test_a_good_push_is_stored_and_served(
    server: ServerProcess,
    stub: pb_grpc.GeneratorStub,
    admin: pb_grpc.ModelAdminStub,
    store: Path,
    tmp_path: Path,
) -> None:
    before = serving_version(stub, "pushy")
    accepted = server.metric("flowserve_model_push_total", result="accepted")
    source = write_dir(tmp_path / "pushy", model_config("pushy"), state_dict(11))
    (source / "notes.txt").write_text("not part of a model: must not be sent")
    response = push(admin, push_chunks(source, chunk_bytes=700))  # several chunks per file
    new = before + 1
    assert response.model.version == new and response.model.serving_version == new
    # The files on disk are the bytes that were sent, and nothing else.
    stored = store / "pushy" / str(new)
    assert sorted(p.name for p in stored.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert sha256_file(stored / name) == sha256_file(source / name)
    info = stub.GetModel(pb.GetModelRequest(model="pushy"), timeout=TIMEOUT)
    assert info.serving_version == new and new in info.versions and before in info.versions
    sample = stub.Sample(pb.SampleRequest(model="pushy", num_samples=3, seed=1), timeout=TIMEOUT)
    assert sample.version == new
    assert server.metric("flowserve_model_push_total", result="accepted") == accepted + 1
    labels = {"model": "pushy", "backend": "eager"}
    assert server.metric("flowserve_model_info", version=str(new), **labels) == 1
    assert ("flowserve_model_info", frozenset({**labels, "version": str(before)}.items())) not in (
        server.metrics()
    )


def test_the_cli_pushes_under_another_name_with_a_token_file(
    server: ServerProcess, stub: pb_grpc.GeneratorStub, store: Path, tmp_path: Path
) -> None:
    before = serving_version(stub, "pushy")
    source = write_dir(tmp_path / "run", model_config("trained-elsewhere"), state_dict(12))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {k: v for k, v in os.environ.items() if k != "FLOWSERVE_ADMIN_TOKEN"}
    command = [sys.executable, "-m", "server", "push", str(source), "--server", server.target]
    result = subprocess.run(
        [*command, "--name", "pushy", "--token-file", str(token_file)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"pushed pushy version {before + 1}" in result.stdout
    assert (
        json.loads((store / "pushy" / str(before + 1) / "config.json").read_text())["name"]
        == "pushy"
    )
    # Without any token the command refuses before connecting.
    refused = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "no admin token" in refused.stderr


class _RunsACommand:
    """Unpickling this runs `touch MARKER`: the payload a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _chunks(header: pb.PushModelHeader | None, files: dict[str, bytes]) -> list[pb.PushModelChunk]:
    chunks = [pb.PushModelChunk(header=header)] if header is not None else []
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        chunks.append(pb.PushModelChunk(file=pb.FileChunk(filename=name, data=data, sha256=digest)))
    return chunks


def _valid_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("config.json", "model.safetensors")}


BadPush = Callable[[Path], tuple[list[pb.PushModelChunk], Code, str]]


def _pickle_named_safetensors(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    files["model.safetensors"] = pickle.dumps(_RunsACommand(tmp / "marker"))
    return _chunks(pb.PushModelHeader(), files), Code.FAILED_PRECONDITION, "convert it"


def _pickle_checkpoint_file(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    files["model.pt"] = pickle.dumps(_RunsACommand(tmp / "marker"))
    return _chunks(pb.PushModelHeader(), files), Code.FAILED_PRECONDITION, "pickle check"


def _truncated_safetensors(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    directory = write_dir(tmp / "m", model_config("pushy"), state_dict(3))
    raw = (directory / "model.safetensors").read_bytes()
    replace_weights(directory, raw[: len(raw) // 2])
    return (
        _chunks(pb.PushModelHeader(), _valid_files(directory)),
        Code.FAILED_PRECONDITION,
        ("not a valid safetensors file"),
    )


def _shape_mismatch(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    directory = write_dir(tmp / "m", model_config("pushy"), state_dict(3))
    wider = NetSpec("time_mlp", {"dim": 2, "hidden": 32, "depth": 2})
    replace_weights(directory, state_dict(3, wider))
    return (
        _chunks(pb.PushModelHeader(), _valid_files(directory)),
        Code.FAILED_PRECONDITION,
        ("shape"),
    )


def _nan_weights(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    directory = write_dir(tmp / "m", model_config("pushy"), state_dict(3))
    weights = state_dict(3)
    weights["output_layer.bias"][0] = float("nan")
    replace_weights(directory, weights)
    return (
        _chunks(pb.PushModelHeader(), _valid_files(directory)),
        Code.FAILED_PRECONDITION,
        ("non-finite"),
    )


def _exploding_samples(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    directory = write_dir(tmp / "m", model_config("pushy"), state_dict(3))
    weights = state_dict(3)
    weights["output_layer.bias"] += 1e6  # finite weights, samples far beyond the bound
    replace_weights(directory, weights)
    return (
        _chunks(pb.PushModelHeader(), _valid_files(directory)),
        Code.FAILED_PRECONDITION,
        ("smoke test"),
    )


def _oversized_file(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    files["model.onnx"] = b"\x08" + bytes(MAX_FILE_BYTES)
    return _chunks(pb.PushModelHeader(), files), Code.FAILED_PRECONDITION, "max_file_bytes"


def _path_traversal(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    files = {"../config.json": files["config.json"], **files}
    return _chunks(pb.PushModelHeader(), files), Code.INVALID_ARGUMENT, "plain file name"


def _corrupted_in_transit(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    chunks = _chunks(pb.PushModelHeader(), files)
    chunks[-1].file.data = chunks[-1].file.data[:-1] + b"\x00"
    return chunks, Code.FAILED_PRECONDITION, "sha256 check"


def _no_header(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    return _chunks(None, files), Code.INVALID_ARGUMENT, "PushModelHeader"


def _other_file(tmp: Path) -> tuple[list[pb.PushModelChunk], Code, str]:
    files = _valid_files(write_dir(tmp / "m", model_config("pushy"), state_dict(3)))
    files["train.py"] = b"print('hello')\n"
    return _chunks(pb.PushModelHeader(), files), Code.FAILED_PRECONDITION, "not accepted"


@pytest.mark.parametrize(
    "bad_push",
    [
        _pickle_named_safetensors,
        _pickle_checkpoint_file,
        _truncated_safetensors,
        _shape_mismatch,
        _nan_weights,
        _exploding_samples,
        _oversized_file,
        _path_traversal,
        _corrupted_in_transit,
        _no_header,
        _other_file,
    ],
)
def test_a_bad_push_is_rejected_and_leaves_the_store_unchanged(
    server: ServerProcess,
    stub: pb_grpc.GeneratorStub,
    admin: pb_grpc.ModelAdminStub,
    store: Path,
    tmp_path: Path,
    bad_push: BadPush,
) -> None:
    chunks, code, fragment = bad_push(tmp_path)
    before = store_snapshot(store)
    serving = serving_version(stub, "pushy")
    rejected = server.metric("flowserve_model_push_total", result="rejected")
    with pytest.raises(grpc.RpcError) as error:
        push(admin, chunks)
    assert error.value.code() == code, error.value.details()
    assert fragment in error.value.details()
    assert str(store) not in error.value.details()  # no server paths in messages
    assert store_snapshot(store) == before
    assert not (store.parent / "config.json").exists()
    assert not (tmp_path / "marker").exists(), "the pickle was loaded"
    assert serving_version(stub, "pushy") == serving
    assert server.metric("flowserve_model_push_total", result="rejected") == rejected + 1


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    # The marker check above can fail: the payload's bytes call os.system when loaded (read
    # from its opcodes, never by loading it), and that call does create the marker.
    marker = tmp_path / "ran"
    payload = _RunsACommand(marker)
    opcodes = [(op.name, arg) for op, arg, _ in pickletools.genops(pickle.dumps(payload))]
    names = [arg for _, arg in opcodes if isinstance(arg, str)]
    assert "system" in names and os.system.__module__ in names
    assert "REDUCE" in [name for name, _ in opcodes]
    call, args = payload.__reduce__()
    call(*args)
    assert marker.exists()


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), Code.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-token-0123456789"),), Code.PERMISSION_DENIED),
    ],
)
def test_a_push_without_the_token_is_refused(
    server: ServerProcess,
    admin: pb_grpc.ModelAdminStub,
    store: Path,
    tmp_path: Path,
    metadata: tuple[tuple[str, str], ...],
    code: Code,
) -> None:
    source = write_dir(tmp_path / "m", model_config("pushy"), state_dict(4))
    before = store_snapshot(store)
    denied = server.metric("flowserve_model_push_total", result="denied")
    with pytest.raises(grpc.RpcError) as error:
        admin.PushModel(push_chunks(source), metadata=metadata, timeout=TIMEOUT)
    assert error.value.code() == code
    assert store_snapshot(store) == before
    assert server.metric("flowserve_model_push_total", result="denied") == denied + 1


def test_the_quality_gate_refuses_a_worse_model_unless_forced(
    stub: pb_grpc.GeneratorStub, admin: pb_grpc.ModelAdminStub, store: Path, tmp_path: Path
) -> None:
    # Serving: random weights, samples near N(0, I), sliced W2 to moons about 0.5. The push
    # shifts every velocity by (3, 3), so its samples sit ~4 units away: several times worse,
    # far beyond the 25% margin (the gate uses the same noise, data and projections for both).
    weights = state_dict(2)
    weights["output_layer.bias"] += 3.0
    source = write_dir(tmp_path / "worse", model_config("gated", dataset="moons"), weights)
    before = store_snapshot(store)
    with pytest.raises(grpc.RpcError) as error:
        push(admin, push_chunks(source))
    assert error.value.code() == Code.FAILED_PRECONDITION
    assert "quality gate" in error.value.details() and "force" in error.value.details()
    assert store_snapshot(store) == before and serving_version(stub, "gated") == 1
    # The same weights as the serving version are not worse: accepted.
    same = write_dir(tmp_path / "same", model_config("gated", dataset="moons"), state_dict(2))
    assert push(admin, push_chunks(same)).model.version == 2
    forced = push(admin, push_chunks(source, force=True))
    assert forced.model.version == 3 and serving_version(stub, "gated") == 3


def test_a_push_under_load_drops_nothing_and_switches_every_client(
    stub: pb_grpc.GeneratorStub, admin: pb_grpc.ModelAdminStub, tmp_path: Path
) -> None:
    old = serving_version(stub, "pushy")
    clients, per_client = 8, 200
    seen: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    started = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        try:
            started.wait(timeout=TIMEOUT)
            for request in range(per_client):
                sent = time.monotonic()
                response = stub.Sample(
                    pb.SampleRequest(model="pushy", num_samples=2, num_steps=2, seed=request),
                    timeout=TIMEOUT,
                )
                seen[index].append((sent, int(response.version)))
        except BaseException as error:  # every failure is reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    started.wait(timeout=TIMEOUT)
    poll(lambda: sum(map(len, seen)) >= 200, "requests before the push", timeout=TIMEOUT)
    source = write_dir(tmp_path / "m", model_config("pushy"), state_dict(21))
    new = push(admin, push_chunks(source)).model.version
    switched = time.monotonic()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "clients did not finish"
    assert not errors, errors[:3]
    assert all(len(responses) == per_client for responses in seen)
    assert new == old + 1
    for responses in seen:
        versions = [version for _, version in responses]
        assert set(versions) <= {old, new}
        # Once a client has seen the new version it never sees the old one again...
        first_new = versions.index(new) if new in versions else len(versions)
        assert all(version == new for version in versions[first_new:])
        # ...and every request sent after the push answered is served by the new version.
        assert all(version == new for sent, version in responses if sent > switched)
    assert any(old in [v for _, v in r] for r in seen), "the push did not happen under load"


def test_pin_rollback_restart_and_unpin(
    server_args: list[str],
    stub: pb_grpc.GeneratorStub,
    admin: pb_grpc.ModelAdminStub,
    store: Path,
    tmp_path: Path,
) -> None:
    latest = serving_version(stub, "pushy")
    metadata = admin_metadata(TOKEN)
    info = admin.SetServingVersion(
        pb.SetServingVersionRequest(model="pushy", version=1), metadata=metadata, timeout=TIMEOUT
    )
    assert info.version == 1 and info.serving_version == 1
    assert json.loads((store / "pushy" / "serving.json").read_text()) == {"version": 1}
    sample = stub.Sample(pb.SampleRequest(model="pushy", num_samples=1), timeout=TIMEOUT)
    assert sample.version == 1
    # A restart (a second server on the same store) serves the pinned version.
    restarted = ServerProcess(server_args, tmp_path / "restart.log")
    try:
        restarted.wait_for_line("flowserve ready")
        with grpc.insecure_channel(restarted.target) as channel:
            other = pb_grpc.GeneratorStub(channel)  # type: ignore[no-untyped-call]
            assert serving_version(other, "pushy") == 1
    finally:
        assert restarted.stop() == 0, restarted.log()
    # Unpinning serves the highest valid version again and removes the pin file.
    info = admin.SetServingVersion(
        pb.SetServingVersionRequest(model="pushy", version=0), metadata=metadata, timeout=TIMEOUT
    )
    assert info.serving_version == latest
    assert not (store / "pushy" / "serving.json").exists()
    with pytest.raises(grpc.RpcError) as error:
        admin.SetServingVersion(
            pb.SetServingVersionRequest(model="pushy", version=99),
            metadata=metadata,
            timeout=TIMEOUT,
        )
    assert error.value.code() == Code.NOT_FOUND
    # A push with make_serving pins itself; a later plain push is stored but does not serve.
    source = write_dir(tmp_path / "m", model_config("pushy"), state_dict(41))
    pinned = push(admin, push_chunks(source, make_serving=True)).model
    assert pinned.serving_version == pinned.version == latest + 1
    assert json.loads((store / "pushy" / "serving.json").read_text()) == {"version": latest + 1}
    later = push(admin, push_chunks(source)).model
    assert later.version == latest + 2 and later.serving_version == latest + 1
    assert serving_version(stub, "pushy") == latest + 1
    unpinned = admin.SetServingVersion(
        pb.SetServingVersionRequest(model="pushy"), metadata=metadata, timeout=TIMEOUT
    )
    assert unpinned.serving_version == latest + 2


def test_directory_mode_serves_a_dropped_version_and_skips_an_invalid_one(
    server: ServerProcess, stub: pb_grpc.GeneratorStub, store: Path, tmp_path: Path
) -> None:
    # An invalid version (NaN weights) dropped first: logged, never served.
    bad = write_dir(tmp_path / "bad", model_config("dropped"), state_dict(5))
    weights = state_dict(5)
    weights["input_layer.weight"][0, 0] = float("inf")
    replace_weights(bad, weights)
    (store / "dropped").mkdir()
    bad.rename(store / "dropped" / "2")
    poll(lambda: "not serving dropped-in" in server.log(), "the invalid version to be skipped")
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModel(pb.GetModelRequest(model="dropped"), timeout=TIMEOUT)
    assert error.value.code() == Code.NOT_FOUND
    # A valid one, written aside and renamed into place as ops should: served.
    good = write_dir(tmp_path / "good", model_config("dropped"), state_dict(6))
    good.rename(store / "dropped" / "1")

    def served() -> bool:
        try:
            return serving_version(stub, "dropped") == 1
        except grpc.RpcError:
            return False

    poll(served, "the dropped-in version to be served")
    sample = stub.Sample(pb.SampleRequest(model="dropped", num_samples=2), timeout=TIMEOUT)
    assert sample.version == 1
    assert serving_version(stub, "dropped") == 1


def test_train_push_pushes_when_training_ends(
    server: ServerProcess, stub: pb_grpc.GeneratorStub, store: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from flowserve.cli import app

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    target = server.target
    previous = torch.get_num_threads()  # --threads sets torch's process-wide thread count
    try:
        result = CliRunner().invoke(
            app,
            [
                "train", "moons", "--steps", "20", "--out", str(tmp_path / "run"),
                "--name", "trained", "--no-progress", "--threads", "1",
                "--push", target, "--push-token-file", str(token_file),
            ],
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    assert "pushed trained version 1" in result.output
    assert serving_version(stub, "trained") == 1
    stored = store / "trained" / "1" / "model.safetensors"
    assert sha256_file(stored) == sha256_file(tmp_path / "run" / "model.safetensors")


def test_an_onnx_file_must_match_the_weights(
    stub: pb_grpc.GeneratorStub, admin: pb_grpc.ModelAdminStub, store: Path, tmp_path: Path
) -> None:
    from export.onnx_network import export_network_onnx

    source = write_dir(tmp_path / "m", model_config("pushy"), state_dict(31))
    # Exported from other weights: the same graph, a different function.
    other = export_network_onnx(build_net(SPEC).requires_grad_(False), (2,))
    (source / "model.onnx").write_bytes(other.SerializeToString())
    before = store_snapshot(store)
    with pytest.raises(grpc.RpcError) as error:
        push(admin, push_chunks(source))
    assert error.value.code() == Code.FAILED_PRECONDITION
    assert "onnx parity" in error.value.details()
    assert store_snapshot(store) == before
    net = build_net(SPEC)
    net.load_state_dict(state_dict(31))
    matching = export_network_onnx(net.requires_grad_(False), (2,))
    (source / "model.onnx").write_bytes(matching.SerializeToString())
    response = push(admin, push_chunks(source))
    stored = store / "pushy" / str(response.model.version)
    assert sha256_file(stored / "model.onnx") == sha256_file(source / "model.onnx")
    assert "onnxruntime" in response.model.available_backends
