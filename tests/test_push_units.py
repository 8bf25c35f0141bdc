"""The push pipeline's pieces without a server: magic detection, the client's chunking, the
receiver's stream checks, the quality score's direction, and the [push] config section."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from flows.nets import NetSpec
from flows.reference import gaussian_linear_velocity, gaussian_log_prob
from flowserve.modeldir import LoadedModel, ModelConfig
from protos.flowserve.v1 import flowserve_pb2 as pb
from server.config import ConfigError, PushConfig, build_config
from server.errors import InvalidArgument, PushRejected
from server.push_client import push_chunks
from server.push_receive import looks_pickled, receive_push
from server.quality import (
    CLASSIFIER_ACCURACY,
    HELDOUT_NLL,
    SLICED_WASSERSTEIN,
    QualityMeter,
    QualityScore,
)
from training.datasets import make_dataset


def test_real_pickles_and_zips_are_recognised_and_safetensors_are_not(tmp_path: Path) -> None:
    for protocol in (2, 3, 4, 5):
        assert looks_pickled(pickle.dumps({"w": [1.0]}, protocol=protocol), "model.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")  # torch's zip format
    assert looks_pickled((tmp_path / "model.pt").read_bytes()[:16], "model.safetensors")
    assert not looks_pickled(save({"w": torch.zeros(2)})[:16], "model.safetensors")
    # A safetensors header whose length starts with the bytes of a pickle opcode (0x80 0x02):
    # the ninth byte, "{", tells them apart.
    head = struct.pack("<Q", 0x0280) + b'{"w":'
    assert head[:2] == b"\x80\x02" and not looks_pickled(head, "model.safetensors")
    assert looks_pickled(head, "config.json")


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_the_client_stream_reassembles_to_the_same_files(tmp_path: Path) -> None:
    files = {
        "config.json": b"{}" * 700,
        "model.safetensors": bytes(range(256)) * 9,
        "model.onnx": b"",
        "notes.txt": b"never sent",
    }
    source = _write(tmp_path / "src", files)
    staging = tmp_path / "staging"
    staging.mkdir()
    chunks = list(push_chunks(source, name="x", force=True, chunk_bytes=500))
    assert chunks[0].header == pb.PushModelHeader(name="x", force=True)
    received = receive_push(iter(chunks), staging, PushConfig())
    assert received.files == ("config.json", "model.safetensors", "model.onnx")
    assert received.name == "x" and received.force and not received.make_serving
    for name in received.files:
        assert (staging / name).read_bytes() == files[name]
    assert not (staging / "notes.txt").exists()


def _file(name: str, data: bytes, offset: int = 0, sha256: str = "") -> pb.PushModelChunk:
    return pb.PushModelChunk(
        file=pb.FileChunk(filename=name, offset=offset, data=data, sha256=sha256)
    )


@pytest.mark.parametrize(
    ("chunks", "error", "fragment"),
    [
        ([_file("config.json", b"{}")], InvalidArgument, "PushModelHeader"),
        (
            [pb.PushModelChunk(header=pb.PushModelHeader()), _file("config.json", b"{}", 5)],
            InvalidArgument,
            "offset",
        ),
        (
            [pb.PushModelChunk(header=pb.PushModelHeader()), _file("config.json", b"{}")],
            InvalidArgument,
            "without its sha256",
        ),
        (
            [pb.PushModelChunk(header=pb.PushModelHeader()), _file("sub/config.json", b"{}")],
            InvalidArgument,
            "plain file name",
        ),
        (
            [pb.PushModelChunk(header=pb.PushModelHeader()), _file("weights.ckpt", b"x")],
            PushRejected,
            "safetensors",
        ),
        (
            [
                pb.PushModelChunk(header=pb.PushModelHeader()),
                _file(
                    "config.json",
                    b"{}",
                    sha256="44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                ),
            ],
            PushRejected,
            "lacks model.safetensors",
        ),
    ],
)
def test_malformed_streams_are_refused_naming_the_problem(
    tmp_path: Path, chunks: list[pb.PushModelChunk], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        receive_push(iter(chunks), tmp_path, PushConfig())


def test_quality_losses_follow_each_metric_direction() -> None:
    serving = QualityScore(SLICED_WASSERSTEIN, 0.5, higher_is_better=False)
    assert QualityScore(SLICED_WASSERSTEIN, 0.75, False).loss(serving) == pytest.approx(0.5)
    assert QualityScore(SLICED_WASSERSTEIN, 0.25, False).loss(serving) < 0
    accuracy = QualityScore(CLASSIFIER_ACCURACY, 0.8, higher_is_better=True)
    assert QualityScore(CLASSIFIER_ACCURACY, 0.6, True).loss(accuracy) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="compare"):
        accuracy.loss(serving)
    # Log-likelihoods have an arbitrary zero: their loss is a difference in nats per dimension.
    nll = QualityScore(HELDOUT_NLL, 1.25, higher_is_better=False, relative=False)
    assert QualityScore(HELDOUT_NLL, 1.5, False, relative=False).loss(nll) == pytest.approx(0.25)


class _GaussianFlowNet(torch.nn.Module):
    """A "network" whose velocity is the exact field of the linear path to N(mu, cov)."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor) -> None:
        super().__init__()
        self._velocity = gaussian_linear_velocity(mu, cov)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._velocity(x, t)


def test_heldout_likelihood_of_a_gaussian_flow_matches_its_closed_form() -> None:
    mu = torch.tensor([0.5, 0.25], dtype=torch.float64)
    cov = torch.tensor([[0.8, 0.3], [0.3, 0.5]], dtype=torch.float64)
    config = ModelConfig(
        name="gauss",
        architecture=NetSpec("time_mlp", {"dim": 2}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="heun",
        default_num_steps=40,
        dataset="moons",
    )
    meter = QualityMeter(num_samples=200, seed=5)
    model = LoadedModel(config, _GaussianFlowNet(mu.float(), cov.float()))
    scores = {score.metric: score for score in meter.measure(model)}
    # The meter's held-out points are fresh moons data from seed + 2.
    held_out = make_dataset("moons", 200, torch.Generator().manual_seed(7)).double()
    exact = -float(gaussian_log_prob(held_out, mu, cov).mean()) / 2
    # rk4 at 40 steps on this smooth field is exact to ~1e-7; float32 rows bring ~1e-5.
    assert scores[HELDOUT_NLL].value == pytest.approx(exact, abs=1e-3)
    assert not scores[HELDOUT_NLL].relative and SLICED_WASSERSTEIN in scores


def test_push_and_poll_settings_come_from_the_config_tree() -> None:
    config = build_config({"push": {"quality_margin": 0.1}, "store": {"poll_seconds": 2}})
    assert config.push.quality_margin == 0.1 and config.store.poll_seconds == 2.0
    assert build_config({}).store.poll_seconds == 0.0  # polling is off unless asked for
    with pytest.raises(ConfigError, match=r"push\.max_file_bytes"):
        build_config({"push": {"max_file_bytes": 0}})
    with pytest.raises(ConfigError, match=r"store\.poll_seconds"):
        build_config({"store": {"poll_seconds": -1.0}})


def test_the_server_rebuilds_the_export_its_backend_needs(tmp_path: Path) -> None:
    from flows.nets import NetSpec
    from flowserve.modeldir import ModelConfig, build_net, load_model_dir, write_model_dir
    from server.push_checks import rebuild_exports

    config = ModelConfig(
        name="m",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 8, "depth": 2}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="euler",
        default_num_steps=4,
    )
    torch.manual_seed(0)
    directory = tmp_path / "m"
    write_model_dir(directory, config, build_net(config).state_dict())
    rebuild_exports(directory, "eager")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    rebuild_exports(directory, "torchscript")
    scripted = torch.jit.load(str(directory / "model.ts"))
    eager = load_model_dir(directory).net
    x, t, labels = torch.randn(5, 2), torch.rand(5), torch.zeros(5, dtype=torch.int64)
    # Same float32 operations in the same order: TorchScript matches eager to rounding.
    torch.testing.assert_close(scripted(x, t, labels), eager(x, t, labels), rtol=0, atol=1e-6)
