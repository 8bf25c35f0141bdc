"""The TorchServe handler driven in-process: initialise on a model directory, handle JSON requests.

The truth is `flows.solvers.sample` on the model's velocity from noise drawn as the handler
documents it (`torch.randn` from a CPU generator seeded with the request's seed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from export.torchserve_handler import FlowServeHandler
from flows.nets import NetSpec
from flows.solvers import sample
from flowserve.modeldir import ModelConfig, build_net, load_model_dir, write_model_dir

CONFIG = ModelConfig(
    name="toycond",
    architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 3}),
    sample_shape=(2,),
    parameterization="velocity",
    path={"kind": "linear"},
    num_classes=3,
    default_solver="heun",
    default_num_steps=4,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ts") / "toycond" / "1"
    write_model_dir(directory, CONFIG, build_net(CONFIG).state_dict())
    return directory


class _Recorder:
    """Collects the statuses the handler sets (TorchServe's Context has the same method)."""

    def __init__(self) -> None:
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def _context(model_dir: Path) -> Any:
    """TorchServe's own Context when TorchServe is installed, else an object with the same
    `system_properties` the handler reads."""
    try:
        from ts.context import Context
    except ImportError:
        return SimpleNamespace(system_properties={"model_dir": str(model_dir)})
    return Context("toycond", str(model_dir), {}, 1, None, "0.12.0")


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> FlowServeHandler:
    handler = FlowServeHandler()
    handler.initialize(_context(model_dir))
    assert handler.initialized
    return handler


def _expected(model_dir: Path, n: int, steps: int, seed: int, label: int, scale: float) -> Any:
    model = load_model_dir(model_dir)
    x_0 = torch.randn((n, 2), generator=torch.Generator().manual_seed(seed))
    velocity_fn = model.velocity_fn(torch.full((n,), label, dtype=torch.int64), scale)
    return sample(velocity_fn, x_0, steps, "heun")


def test_request_matches_flows_sampler(handler: FlowServeHandler, model_dir: Path) -> None:
    body = {"num_samples": 5, "num_steps": 6, "seed": 11, "class_labels": [2], "guidance_scale": 2}
    (response,) = handler.handle([{"body": json.dumps(body).encode()}], _Recorder())
    assert response["shape"] == [5, 2]
    assert (response["seed"], response["num_steps"], response["solver"]) == (11, 6, "heun")
    expected = _expected(model_dir, 5, 6, 11, 2, 2.0)
    # Same computation (JSON floats round-trip fp32 values exactly).
    torch.testing.assert_close(torch.tensor(response["samples"]), expected, atol=0, rtol=0)


def test_seed_fixes_the_samples_and_defaults_apply(handler: FlowServeHandler) -> None:
    body = {"num_samples": 3, "seed": 5}
    first, second, other = handler.handle(
        [{"body": body}, {"data": json.dumps(body)}, {"body": {**body, "seed": 6}}], _Recorder()
    )
    assert first["samples"] == second["samples"]
    assert first["samples"] != other["samples"]
    assert first["num_steps"] == CONFIG.default_num_steps  # num_steps absent: the default


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"num_steps": 4}, "num_samples"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2, "class_labels": [7]}, "class_labels"),
        ({"num_samples": 2, "solver": "leapfrog"}, "solver"),
        ({"num_samples": 2, "num_steps": 5000}, "num_steps"),
        ({"num_samples": 2, "colour": "red"}, "colour"),
        ("not json", "JSON"),
    ],
)
def test_bad_request_gets_400_and_the_others_are_answered(
    handler: FlowServeHandler, body: object, field: str
) -> None:
    recorder = _Recorder()
    bad = body if isinstance(body, str) else json.dumps(body)
    responses = handler.handle([{"body": bad}, {"body": {"num_samples": 1, "seed": 1}}], recorder)
    assert field in responses[0]["error"]
    assert recorder.statuses[0][0] == 400
    assert responses[1]["shape"] == [1, 2] and 1 not in recorder.statuses
