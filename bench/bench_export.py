"""Export benchmark: eager vs TorchScript vs onnxruntime per step vs the exported whole loop.

Model: the shipped moons MLP (4x256 SiLU, velocity on the linear path) when
`model_store/moons/1` exists, else the same architecture randomly initialised (speed does not
depend on the weights). Work: `--steps` fixed Euler steps (default 50, the moons default) at
batch 1, 64 and 4,096. Variants, timed in interleaved rounds (best of the rounds) so that load
drift on a shared machine hits all alike:

- eager (the baseline): a Python loop of `x = x + dt * net(x, t, labels)` under no_grad;
- torchscript: the same loop calling `model.ts`;
- onnxruntime/step: the same loop calling `model.onnx` once per step (numpy in and out);
- onnx loop: one call of `sampler.onnx`, whose ONNX Loop runs every step inside onnxruntime.

Targets: at batch 1 to 64 the whole loop is at least 2x faster than eager; at 4,096 no backend
is more than 10% slower than eager. torch and onnxruntime both use `--threads` (default 2).
Run with `python -m bench export` or `python -m bench.bench_export --steps 20`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import Measurement, describe_machine, print_table
from export.contract import ONNX_FILE, SAMPLER_FILE, TORCHSCRIPT_FILE
from export.model_export import export_model_dir
from export.onnx_runtime import open_session
from export.parity import run_sampler
from export.torchscript import load_torchscript
from flows.nets import NetSpec
from flowserve.modeldir import ModelConfig, build_net, load_model_dir, write_model_dir

BATCHES = (1, 64, 4096)
SHIPPED = Path(__file__).resolve().parents[1] / "model_store" / "moons" / "1"
LOOP_SPEEDUP_TARGET = 2.0  # whole loop vs eager at batch <= 64
LARGE_BATCH_FLOOR = 0.9  # every backend vs eager at batch 4,096


def _model_dir(work: Path) -> Path:
    """A copy of the shipped moons model (or a random one of its architecture) to export."""
    directory = work / "moons" / "1"
    if (SHIPPED / "model.safetensors").is_file():
        loaded = load_model_dir(SHIPPED)
        write_model_dir(directory, loaded.config, loaded.net.state_dict())
        return directory
    config = ModelConfig(
        name="moons",
        architecture=NetSpec("time_mlp", {"dim": 2, "hidden": 256, "depth": 4}),
        sample_shape=(2,),
        parameterization="velocity",
        path={"kind": "linear"},
        num_classes=0,
        default_solver="heun",
        default_num_steps=50,
    )
    torch.manual_seed(0)
    write_model_dir(directory, config, build_net(config).state_dict())
    return directory


def torch_loop(net: Callable[..., torch.Tensor], x_0: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler in a Python loop around a torch callable `(x, t, class_labels) -> v`."""
    batch = x_0.shape[0]
    labels = torch.zeros(batch, dtype=torch.int64)
    dt = 1.0 / steps
    x = x_0
    with torch.no_grad():
        for i in range(steps):
            x = x + dt * net(x, torch.full((batch,), i * dt), labels)
    return x


def onnx_step_loop(session: object, x_0: np.ndarray, steps: int) -> np.ndarray:
    """Euler in a Python loop, one onnxruntime call per step."""
    run = session.run  # type: ignore[attr-defined]
    batch = x_0.shape[0]
    labels = np.zeros(batch, dtype=np.int64)
    dt = np.float32(1.0 / steps)
    x = x_0
    for i in range(steps):
        t = np.full(batch, i * dt, dtype=np.float32)
        (v,) = run(["prediction"], {"x": x, "t": t, "class_labels": labels})
        x = x + dt * v
    return x


def interleaved_best(
    variants: dict[str, Callable[[], object]], rounds: int, items: int
) -> list[Measurement]:
    """Best time of each variant over `rounds`, running the variants in turn each round."""
    for fn in variants.values():
        fn()  # warm-up: allocators, thread pools, ORT's first-run initialisation
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return [Measurement(name, seconds, items) for name, seconds in best.items()]


def main(argv: Sequence[str] | None = None) -> None:
    """Export the moons model once, then time every backend at each batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="Euler steps per sampling call")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best is kept)")
    args = parser.parse_args([] if argv is None else argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        directory = _model_dir(Path(work))
        export_model_dir(directory, ["torchscript", "onnx"])
        net: nn.Module = load_model_dir(directory).net
        scripted = load_torchscript(directory / TORCHSCRIPT_FILE)
        step_session = open_session(directory / ONNX_FILE, args.threads)
        loop_session = open_session(directory / SAMPLER_FILE, args.threads)
        source = "shipped moons" if (SHIPPED / "model.safetensors").is_file() else "random"
        verdicts = []
        for batch in BATCHES:
            x_0 = torch.randn((batch, 2), generator=torch.Generator().manual_seed(batch))
            x_0_np = x_0.numpy()
            labels, ones = torch.zeros(batch, dtype=torch.int64), torch.ones(batch)
            variants: dict[str, Callable[[], object]] = {
                "eager": partial(torch_loop, net, x_0, args.steps),
                "torchscript": partial(torch_loop, scripted, x_0, args.steps),
                "onnxruntime/step": partial(onnx_step_loop, step_session, x_0_np, args.steps),
                "onnx loop": partial(
                    run_sampler, loop_session, x_0, args.steps, "euler", labels, ones
                ),
            }
            # Fewer rounds where one run takes seconds.
            rounds = args.rounds if batch <= 64 else max(2, args.rounds // 2)
            results = interleaved_best(variants, rounds, batch)
            print_table(
                f"batch {batch}, {args.steps} Euler steps ({source} 4x256 MLP)",
                results,
                baseline="eager",
            )
            eager = next(m for m in results if m.name == "eager").seconds
            ratios = {m.name: eager / m.seconds for m in results}
            if batch <= 64:
                ok = ratios["onnx loop"] >= LOOP_SPEEDUP_TARGET
                verdicts.append(
                    f"batch {batch}: onnx loop x{ratios['onnx loop']:.2f} vs eager "
                    f"(target >= {LOOP_SPEEDUP_TARGET}): {'PASS' if ok else 'FAIL'}"
                )
            else:
                slowest = min(ratios, key=lambda name: ratios[name])
                ok = ratios[slowest] >= LARGE_BATCH_FLOOR
                verdicts.append(
                    f"batch {batch}: slowest backend {slowest} x{ratios[slowest]:.2f} vs eager "
                    f"(target >= {LARGE_BATCH_FLOOR}): {'PASS' if ok else 'FAIL'}"
                )
        print("\ntargets:")
        for line in verdicts:
            print(f"  {line}")


if __name__ == "__main__":
    main(sys.argv[1:])
