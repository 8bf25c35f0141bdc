"""A real Triton Inference Server serving a flowserve model directory: the benchmark peer.

Runs INSIDE the peer venv (bench/peers/triton_env.py), never in the main venv: PyTriton 0.7.0
bundles Triton 2.51 and its Python-backend stub, which needs Debian's python3.11. Started and
stopped by `bench.peers.triton.TritonPeer`; by hand:

    .bench-venvs/pytriton/bin/python bench/peers/triton_server.py --model-dir STORE/NAME/1 \\
        --steps 100 --solver euler --grpc-port 8101 --http-port 8100 --metrics-port 8102

It binds one model, named as in the directory's config.json: input NOISE `[*sample_shape]` FP32,
output SAMPLES of the same shape, `max_batch_size` rows per batch, filled by Triton's dynamic
batcher. The infer function is flowserve's own math, imported from this repository: the network
is rebuilt by `flowserve.modeldir.load_model_dir` from the same safetensors weights and integrated
by `flows.solvers.sample` with a fixed solver and step count. So the peer and flowserve differ
only in the serving machinery around the sampler, which is what the benchmark compares.

Request parameters `num_steps` and `solver`, as flowserve's OIP endpoint reads them, are
accepted so that the very same request can be sent to both servers; a value different from this
server's fixed one fails the request instead of silently measuring different work.

Prints `triton peer ready: model NAME grpc HOST:PORT http HOST:PORT metrics HOST:PORT` once
Triton answers, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

# flows/ imports only torch; flowserve.modeldir adds safetensors. Both import cleanly in the peer
# venv, so the peer runs exactly the repository's network and solver rather than a copy of them.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from flows.solvers import ODE_SOLVERS, sample  # noqa: E402
from flowserve.modeldir import load_model_dir  # noqa: E402

NOISE, SAMPLES = "NOISE", "SAMPLES"
READY_PREFIX = "triton peer ready:"
# How often the main thread checks that Triton and its proxy backend are still alive.
MONITOR_PERIOD_S = 1.0

Sampler = Callable[[np.ndarray], np.ndarray]


def build_sampler(
    model_dir: Path, solver: str, num_steps: int
) -> tuple[str, tuple[int, ...], Sampler]:
    """Load a model directory and return its name, sample shape and a batch sampler.

    Args:
        model_dir: A flowserve model directory (config.json + model.safetensors).
        solver: One of `flows.solvers.ODE_SOLVERS`.
        num_steps: Fixed number of solver steps, >= 1.

    Returns:
        `(name, sample_shape, sampler)`, where `sampler(noise)` maps float32 noise of shape
        `(batch, *sample_shape)` to samples at t = 1 of the same shape, as `flows.solvers.sample`
        computes them with the model's unconditional velocity field.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"--solver must be one of {ODE_SOLVERS}, got {solver!r}")
    if num_steps < 1:
        raise ValueError(f"--steps must be >= 1, got {num_steps}")
    model = load_model_dir(model_dir, verify=True)
    if model.config.num_classes != 0:
        # Class labels and guidance would need more inputs; the benchmark models have none.
        raise ValueError(f"{model_dir}: only unconditional models are supported by this peer")
    velocity_fn = model.velocity_fn()
    sample_shape = tuple(model.config.sample_shape)

    def sampler(noise: np.ndarray) -> np.ndarray:
        x_0 = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
        x_1 = sample(velocity_fn, x_0, num_steps=num_steps, solver=solver)  # (batch, *shape)
        return x_1.numpy()

    return model.config.name, sample_shape, sampler


def check_parameters(parameters: dict[str, Any] | None, solver: str, num_steps: int) -> None:
    """Reject requests that ask for other work than this server's fixed solver and steps.

    Raises:
        ValueError: `num_steps` or `solver` is given and differs from the server's.
    """
    if not parameters:
        return
    steps = parameters.get("num_steps")
    # 0 means "the model's default" in flowserve's API; here the default is the fixed count.
    if steps is not None and int(steps) not in (0, num_steps):
        raise ValueError(f"this Triton peer runs num_steps={num_steps}, the request asks {steps}")
    name = parameters.get("solver")
    if name is not None and str(name).lower() != solver:
        raise ValueError(f"this Triton peer runs solver={solver!r}, the request asks {name!r}")


def make_infer_func(sampler: Sampler, solver: str, num_steps: int) -> Callable[[list[Any]], Any]:
    """The PyTriton inference callable: checks every request, then samples the merged batch."""
    from pytriton.decorators import batch

    @batch
    def infer_batch(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        # @batch has concatenated the requests' NOISE along the batch axis.
        return {SAMPLES: sampler(inputs[NOISE])}

    def infer(requests: list[Any]) -> Any:
        for request in requests:
            check_parameters(request.parameters, solver, num_steps)
        return infer_batch(requests)

    return infer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--solver", default="euler", choices=ODE_SOLVERS)
    parser.add_argument("--host", default="127.0.0.1", help="address every endpoint binds")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)"
    )
    parser.add_argument(
        "--workspace", type=Path, default=None, help="PyTriton workspace (default: a temp dir)"
    )
    parser.add_argument("--log-file", type=Path, default=None, help="Triton's own log file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start Triton with the model bound, print the ready line, serve until SIGTERM or SIGINT."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    name, sample_shape, sampler = build_sampler(args.model_dir, args.solver, args.steps)

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before Triton starts so that an early SIGTERM still ends in a clean stop.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    config = TritonConfig(
        grpc_address=args.host,
        grpc_port=args.grpc_port,
        http_address=args.host,
        http_port=args.http_port,
        metrics_address=args.host,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        # Bounds Triton's shutdown wait: unloading the model takes about 2 s here, and an unload
        # cut short would leave the Python backend's /tmp/folderXXXXXX behind.
        exit_timeout_secs=5,
    )
    model_config = ModelConfig(
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=name,
            infer_func=make_infer_func(sampler, args.solver, args.steps),
            inputs=[Tensor(name=NOISE, dtype=np.float32, shape=sample_shape)],
            outputs=[Tensor(name=SAMPLES, dtype=np.float32, shape=sample_shape)],
            config=model_config,
        )
        triton.run()  # starts tritonserver and waits until it and the model are ready
        print(
            f"{READY_PREFIX} model {name} grpc {args.host}:{args.grpc_port} "
            f"http {args.host}:{args.http_port} metrics {args.host}:{args.metrics_port} "
            f"(solver {args.solver}, {args.steps} steps, max batch {args.max_batch_size}, "
            f"queue delay {args.queue_delay_us} us, torch threads {torch.get_num_threads()})",
            flush=True,
        )
        while not stop.wait(MONITOR_PERIOD_S):
            if not triton.is_alive():
                print("triton peer: Triton or its proxy backend died", file=sys.stderr, flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
