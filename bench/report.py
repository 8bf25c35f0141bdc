"""`make bench-report`: flowserve against its peers on one machine, written to bench/REPORT.md.

Runs, in one go, on the same network, weights and inputs (see `bench.report_model`):

1. sampling throughput against batch size: an eager loop, flows' sampler, flow_matching's
   ODESolver, torchdiffeq, flowserve's engine in-process and flowserve over gRPC;
2. many single-sample clients: flowserve (step-level and request-level batching) against a real
   Triton Inference Server with its dynamic batcher, throughput and latency against concurrency;
3. one 1-sample, 50-step request at a time: flowserve, Triton and TorchServe;
4. likelihood throughput, exact divergence against Hutchinson's estimator;

then writes the tables, PNG plots and the verdict on every target into bench/REPORT.md. Every
figure is a ratio against a baseline measured in the same run, with the machine described.
Peers that cannot run here (no Java for TorchServe, no Python 3.11 for PyTriton) are reported as
skipped with the reason, never silently dropped.

    python -m bench.report [--out bench/REPORT.md] [--skip-triton] [--skip-torchserve] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import describe_machine
from bench.plots import line_plot
from bench.report_likelihood import LikelihoodRow, measure_likelihood
from bench.report_markdown import Target, missed_notes, rate, table, targets_table
from bench.report_model import load_bench_model, write_bench_store
from bench.report_sampling import BASELINE, GRPC, SamplingResult, measure_sampling
from bench.report_serving import (
    CONCURRENCY,
    FLOWSERVE_OIP,
    FLOWSERVE_ONNX,
    LATENCY_STEPS,
    STEPS,
    TRITON,
    ConcurrencyResult,
    LatencyFloor,
    best_flowserve,
    measure_concurrency,
    measure_latency,
    measure_latency_floor,
)
from bench.server_process import FlowserveProcess
from export.model_export import export_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# Single-request latency is measured with every CPU backend: the per-step overhead differs.
LATENCY_BACKENDS = ("eager", "torchscript", "onnxruntime")
SHIPPED_STORE = REPO_ROOT / "model_store"
TORCHSERVE = "TorchServe 0.12 (.mar, REST)"


def _triton_factory(model_dir: Path, skip: bool) -> tuple[Callable[[int], Any] | None, str]:
    """A `steps -> TritonPeer` factory, or None and the reason Triton cannot run here."""
    if skip:
        return None, "skipped on request (--skip-triton)"
    try:
        from bench.peers.triton import TritonPeer
        from bench.peers.triton_env import ensure_venv

        ensure_venv(REPO_ROOT)  # built once, before anything is timed
    except Exception as error:  # the report goes on without this peer, and says why
        return None, f"not available: {type(error).__name__}: {error}"
    return (lambda steps: TritonPeer(model_dir, steps=steps, solver="euler")), ""


def _torchserve_factory(model_dir: Path, skip: bool) -> tuple[Callable[[], Any] | None, str]:
    """A TorchServe peer factory, or None and the reason it cannot run here."""
    if skip:
        return None, "skipped on request (--skip-torchserve)"
    if shutil.which("java") is None:
        return None, "not available: no Java runtime on this machine"
    from bench.peers.torchserve import TorchServePeer

    # One worker, one torch thread: TorchServe's default deployment of one model.
    return (lambda: TorchServePeer(model_dir, torch_threads=1)), ""


def run(out: Path, skip_triton: bool, skip_torchserve: bool, quick: bool) -> list[Target]:
    """Run every section, write the report and its plots; returns the targets."""
    started = time.perf_counter()
    images = out.parent / "report"
    with tempfile.TemporaryDirectory(prefix="flowserve-report-") as tmp:
        store = Path(tmp)
        model_dir = write_bench_store(store)
        print("exporting the report network (TorchScript, ONNX) for the compiled backends")
        export_model_dir(model_dir, ("torchscript", "onnx"))
        loaded = load_bench_model(model_dir)
        triton, triton_note = _triton_factory(model_dir, skip_triton)
        torchserve, torchserve_note = _torchserve_factory(model_dir, skip_torchserve)

        print("[1/4] sampling throughput against batch size", flush=True)
        batch_sizes = (1, 16, 256, 4096) if quick else (1, 16, 64, 256, 1024, 4096)
        with FlowserveProcess(store, {"metrics": {"enabled": False}}) as server:
            rounds = 2 if quick else 3
            sampling = measure_sampling(loaded, server.target, batch_sizes, rounds)
        print("[2/4] single-sample clients against concurrency", flush=True)
        levels = (1, 16, 256) if quick else CONCURRENCY
        concurrency = measure_concurrency(store, triton, levels)
        print("[3/4] 1-sample, 50-step latency", flush=True)
        latency = measure_latency(store, triton, torchserve, LATENCY_BACKENDS)
        floor = measure_latency_floor(store, model_dir)
    print("[4/4] likelihood: exact against Hutchinson", flush=True)
    likelihood = measure_likelihood(SHIPPED_STORE, rounds=1 if quick else 2)

    ceiling = _ceiling(sampling, concurrency)
    targets = _targets(sampling, concurrency, latency, floor, ceiling)
    text = _render(
        sampling,
        concurrency,
        latency,
        floor,
        likelihood,
        targets,
        ceiling,
        images,
        notes={"Triton": triton_note, "TorchServe": torchserve_note},
        seconds=time.perf_counter() - started,
    )
    out.write_text(text)
    print(f"wrote {out} and its plots in {images}/ ({time.perf_counter() - started:.0f} s)")
    return targets


@dataclass(frozen=True)
class Ceiling:
    """What this machine allows a server of 1-sample requests, whatever the server does.

    Attributes:
        cores: torch threads (= cores) the compute figures used.
        compute: CPU seconds of network compute per sample at batch 256 (the eager loop).
        client: CPU seconds the load generator spends per request (flowserve OIP, top level).
        rate: cores / (compute + client): samples/s of a server with no overhead of its own.
    """

    cores: int
    compute: float
    client: float

    @property
    def rate(self) -> float:
        """Samples/s of a zero-overhead server on these cores."""
        return self.cores / (self.compute + self.client)


def _ceiling(sampling: SamplingResult, concurrency: ConcurrencyResult) -> Ceiling:
    batch = max(b for b in sampling.batch_sizes if b <= 256)
    eager_rate = sampling.rates[BASELINE][sampling.batch_sizes.index(batch)]
    cores = torch.get_num_threads()
    return Ceiling(cores, cores / eager_rate, concurrency.cpu[FLOWSERVE_OIP].client)


def _targets(
    sampling: SamplingResult,
    concurrency: ConcurrencyResult,
    latency: dict[str, Any],
    floor: LatencyFloor,
    ceiling: Ceiling,
) -> list[Target]:
    largest = sampling.batch_sizes[-1]
    grpc_ratio = sampling.rates[GRPC][-1] / sampling.rates[BASELINE][-1]
    top = concurrency.concurrency[-1]
    flowserve_top = concurrency.throughput(FLOWSERVE_OIP, top)
    serial = concurrency.throughput(FLOWSERVE_OIP, 1)
    server = concurrency.cpu[FLOWSERVE_OIP].server
    overhead = (
        f"flowserve spends {server * 1e6:,.0f} us of server CPU per request, of which the "
        f"network is {ceiling.compute * 1e6:,.0f} us; the rest is Python gRPC and request "
        "handling, serialised by one interpreter's GIL"
    )
    targets = [
        Target(
            f"flowserve gRPC / in-process eager loop, one request of {largest} samples",
            grpc_ratio,
            0.9,
            "the server and the client copy and convert every sample; see section 1",
        ),
        Target(
            f"{top} concurrent 1-sample clients / one client at a time (flowserve OIP)",
            flowserve_top / serial,
            15.0,
            f"15x the serial {serial:,.0f} samples/s is {15 * serial:,.0f}/s; a server with no "
            f"overhead at all could reach {ceiling.rate:,.0f}/s on these {ceiling.cores} cores "
            f"(network {ceiling.compute * 1e6:,.0f} us + load generator "
            f"{ceiling.client * 1e6:,.0f} us of CPU per request), and {overhead}.",
        ),
    ]
    if FLOWSERVE_ONNX in concurrency.runs:
        solo_serial = concurrency.throughput(FLOWSERVE_ONNX, 1)
        targets.append(
            Target(
                f"{top} concurrent 1-sample clients / one client at a time (flowserve OIP, "
                "onnxruntime: lone requests take the solo fast path)",
                concurrency.throughput(FLOWSERVE_ONNX, top) / solo_serial,
                15.0,
                f"the solo fast path makes the serial baseline {solo_serial:,.0f} samples/s, "
                f"so 15x is {15 * solo_serial:,.0f}/s, beyond the {ceiling.rate:,.0f}/s a "
                "zero-overhead server could reach here: a faster lone request lowers this "
                "ratio by design.",
            )
        )
    if TRITON in concurrency.runs:
        triton_top = concurrency.throughput(TRITON, top)
        targets.append(
            Target(
                f"flowserve / Triton, {top} concurrent 1-sample clients (OIP, same client)",
                flowserve_top / triton_top,
                4.0,
                f"Triton served {triton_top:,.0f} samples/s, so 4x is {4 * triton_top:,.0f}/s, "
                f"but a server with no overhead at all tops out at {ceiling.rate:,.0f}/s here "
                f"({ceiling.rate / triton_top:.1f}x Triton): the target cannot be met on this "
                f"machine by any server. Against that ceiling, {overhead}; Triton's C++ "
                f"frontend spends {concurrency.cpu[TRITON].server * 1e6:,.0f} us per request "
                "(its whole process tree, network included).",
            )
        )
    best_name, best = best_flowserve(latency)
    for peer, threshold in ((TORCHSERVE, 5.0), (TRITON, 2.0)):
        if peer in latency:
            targets.append(
                Target(
                    f"1-sample {LATENCY_STEPS}-step latency, "
                    f"{peer.split(' (')[0]} p50 / flowserve p50",
                    latency[peer].p50 / best.p50,
                    threshold,
                    _latency_gap(peer, latency[peer].p50 / threshold, best_name, best.p50, floor),
                )
            )
    return targets


def _latency_gap(peer: str, needed: float, best_name: str, best: float, floor: LatencyFloor) -> str:
    """Why flowserve's best p50 misses `needed` seconds: its parts, measured in this run."""
    handling = best - floor.sampler - floor.empty_rpc
    return (
        f"the target needs flowserve at {needed * 1e3:.2f} ms; its best ({best_name}) took "
        f"{best * 1e3:.2f} ms: the whole-loop sampler alone takes {floor.sampler * 1e3:.2f} ms "
        f"in-process and an empty gRPC round trip {floor.empty_rpc * 1e3:.2f} ms on this "
        f"machine, which leaves {handling * 1e3:.2f} ms of request handling in Python "
        "(decoding, validation, the job record, encoding). "
        f"{peer.split(' (')[0]} runs the same eager network once per step."
    )


def _render(
    sampling: SamplingResult,
    concurrency: ConcurrencyResult,
    latency: dict[str, Any],
    floor: LatencyFloor,
    likelihood: Sequence[LikelihoodRow],
    targets: Sequence[Target],
    ceiling: Ceiling,
    images: Path,
    notes: dict[str, str],
    seconds: float,
) -> str:
    throughput_png = line_plot(
        images / "throughput_vs_batch.png",
        f"Sampling throughput, {STEPS} Euler steps, 4x256 MLP",
        "samples per request (batch size)",
        "samples / s",
        sampling.batch_sizes,
        sampling.rates,
    )
    levels = concurrency.concurrency
    conc_png = line_plot(
        images / "throughput_vs_concurrency.png",
        f"1-sample requests, {STEPS} Euler steps: throughput",
        "concurrent clients",
        "samples / s",
        levels,
        {name: [r.throughput for r in runs] for name, runs in concurrency.runs.items()},
    )
    latency_png = line_plot(
        images / "latency_vs_concurrency.png",
        f"1-sample requests, {STEPS} Euler steps: p50 latency",
        "concurrent clients",
        "p50 latency (ms)",
        levels,
        {name: [r.p50 * 1e3 for r in runs] for name, runs in concurrency.runs.items()},
    )
    rel = lambda path: path.relative_to(images.parent).as_posix()  # noqa: E731
    base = sampling.rates[BASELINE]
    sampling_rows = [
        (name, *(f"{rate(v)} (x{v / b:.2f})" for v, b in zip(values, base, strict=True)))
        for name, values in sampling.rates.items()
    ]
    conc_rows = [
        (
            name,
            *(f"{rate(r.throughput)} / {r.p50 * 1e3:.0f} / {r.p99 * 1e3:.0f}" for r in runs),
        )
        for name, runs in concurrency.runs.items()
    ]
    cpu_rows = [
        (
            name,
            rate(runs[-1].throughput),
            f"{concurrency.cpu[name].client * 1e6:,.0f}",
            f"{concurrency.cpu[name].server * 1e6:,.0f}",
        )
        for name, runs in concurrency.runs.items()
    ]
    _, best = best_flowserve(latency)
    latency_rows = [
        (name, f"{r.p50 * 1e3:.2f}", f"{r.p99 * 1e3:.2f}", f"x{r.p50 / best.p50:.2f}")
        for name, r in sorted(latency.items(), key=lambda item: item[1].p50)
    ]
    likelihood_rows = [
        (
            f"{row.case.model} (D={row.dimension})",
            f"{row.case.points} x {row.case.steps} steps",
            rate(row.exact_rate),
            f"{rate(row.hutchinson_rate)} (k={row.case.probes})",
            f"x{row.speedup:.2f}",
            f"{row.mean_abs_gap:.3f} / {row.mean_std_error:.3f}",
        )
        for row in likelihood
    ]
    skipped = "\n".join(f"- {peer}: {note}" for peer, note in notes.items() if note)
    missed = missed_notes(targets)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# flowserve performance report

Generated by `make bench-report` ({when}, {seconds:.0f} s). Machine: {describe_machine()}.
Every ratio compares figures measured in this same run. Network: TimeMLP 4x256 SiLU on 2-D data
(the shipped `moons` architecture), random weights, the same weights for every peer.

## Targets

{targets_table(targets)}

{("Where a target is missed:" + chr(10) + chr(10) + missed) if missed else "Every target is met."}

{("Peers not measured in this run:" + chr(10) + chr(10) + skipped) if skipped else ""}

## 1. Sampling throughput against batch size

One request of B samples x {STEPS} Euler steps; samples/s and the ratio against the
`{BASELINE}` at the same batch size (best of interleaved rounds). flowserve over gRPC runs the
server in its own process; the client decodes the samples. Max |variant - eager loop| over all
batches: {", ".join(f"{k} {v:.1e}" for k, v in sampling.max_abs_diff.items() if k != BASELINE)}.

{table(["variant", *(f"B={b}" for b in sampling.batch_sizes)], sampling_rows)}

![throughput against batch size]({rel(throughput_png)})

## 2. Many single-sample clients

Closed-loop clients (one request in flight each), 1 sample x {STEPS} Euler steps per request;
cells are samples/s / p50 ms / p99 ms. Step-level batching lets a request join the running batch
at the next solver step; request-level batching (and Triton's dynamic batcher) batch whole
requests, so a request waits for the batch in front of it to finish all its steps.

{table(["variant", *(f"{c} clients" for c in levels)], conc_rows)}

![throughput against concurrency]({rel(conc_png)})
![latency against concurrency]({rel(latency_png)})

### Where the time goes at {levels[-1]} clients

CPU per request, from /proc (the server's whole process tree) and the load generator's own
rusage; the network alone costs {ceiling.compute * 1e6:,.0f} us per sample at batch 256 on
{ceiling.cores} cores (section 1). A server with no overhead of its own could serve at most
{ceiling.rate:,.0f} samples/s on this machine with this client.

{table(["variant", "samples/s", "client CPU us/request", "server CPU us/request"], cpu_rows)}

## 3. One 1-sample, {LATENCY_STEPS}-step request at a time

{table(["server", "p50 ms", "p99 ms", "p50 / best flowserve"], latency_rows)}

With the onnxruntime backend a lone request takes the solo fast path (`[engine]
solo_max_evaluations`): it runs the exported whole loop (`sampler.onnx`) in one call on the
request's own thread. The floor under that figure, measured in this run: the whole-loop sampler
alone, called in-process, {floor.sampler * 1e3:.2f} ms (p50); an empty gRPC round trip (OIP
ServerLive, same client), {floor.empty_rpc * 1e3:.2f} ms (p50).

## 4. Likelihood: exact divergence against Hutchinson

Points/s through the engine (Euler); the last column is the mean |Hutchinson - exact| next to
Hutchinson's own mean standard error, both in nats. Exact costs one Jacobian column per
dimension; Hutchinson costs k vector-Jacobian products whatever the dimension, so it wins as D
grows and loses at D=2, where the exact trace is only two columns.

{table(_LIKELIHOOD_HEADER, likelihood_rows)}

## 5. GPU

{_gpu_section()}
"""


_LIKELIHOOD_HEADER = (
    "model",
    "work",
    "exact points/s",
    "Hutchinson points/s",
    "speed-up",
    "gap / std err",
)


def _gpu_section() -> str:
    if torch.cuda.is_available():
        return "A GPU is present: run `python -m bench.report_gpu` for its section."
    return (
        "Not measured: no GPU was lent to this run. The CUDA paths (CUDA graphs, fused Triton "
        "step kernels) are exercised by `tests/test_export_cuda_graph.py` and "
        "`tests/test_triton_kernels.py` on a GPU, and under `TRITON_INTERPRET=1` on the CPU."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the report; exit 0 whatever the verdicts (they are in the file)."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "REPORT.md")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer points and rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with contextlib.suppress(KeyboardInterrupt):
        targets = run(args.out, args.skip_triton, args.skip_torchserve, args.quick)
        for target in targets:
            print(f"  {target.name}: {target.ratio:.2f} (>= {target.threshold:g}) {target.verdict}")
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
