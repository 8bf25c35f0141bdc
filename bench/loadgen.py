"""A closed-loop gRPC load generator shared by every benchmark peer.

`concurrency` coroutines on one asyncio loop each send a request, await its answer and send the
next, until `requests` have been sent in total: the load a fleet of synchronous clients puts on a
server, and the regime where a dynamic batcher earns its keep. The same client code drives every
peer; only the request maker differs:

- `oip_infer`: OIP (KServe v2) `ModelInfer` with input NOISE `[1, *sample_shape]` FP32 in
  `raw_input_contents`. Triton and flowserve's OIP endpoint answer the very same message, so
  they are compared with the same client, protocol and bytes on the wire.
- `flowserve_sample`: flowserve.v1 `Generator.Sample` with `num_samples=1`.

    result = run_closed_loop("127.0.0.1:8001", oip_infer("bench-mlp", (2,)), 256, 512, 120.0)
    print(result.throughput, result.p50, result.p99, result.errors)

Every loop is bounded: each coroutine stops once `requests` are sent or `timeout_s` has passed,
and every RPC carries the remaining time as its deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
import numpy as np

from protos.flowserve.v1 import flowserve_pb2 as pb
from protos.flowserve.v1 import flowserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as oip
from protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc

NOISE, SAMPLES, FP32 = "NOISE", "SAMPLES", "FP32"
BAD_RESPONSE = "BAD_RESPONSE"
CHANNEL_READY_TIMEOUT_S = 30.0
# Distinct noises per request maker; request i uses noise i mod this (its bytes built once).
NOISE_POOL = 1024
# Every channel of one run gets its own TCP connection: grpc otherwise shares subchannels
# between channels to the same target, and one HTTP/2 connection would carry all the load.
_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)

Call = Callable[[int, float], Awaitable[object]]
"""`call(index, timeout_s)`: send request number `index` with that deadline, await the answer."""

MakeCall = Callable[[grpc.aio.Channel], Call]
"""Builds a `Call` bound to one channel (stubs are made once per channel, not per request)."""


class BadResponse(Exception):
    """The server answered, but not with what the request asked for."""


@dataclass(frozen=True)
class LoadResult:
    """The outcome of one closed-loop run.

    Attributes:
        wall_seconds: From the first request sent to the last answer received.
        latencies: Seconds per successful request, in completion order.
        errors: Failed requests by gRPC status code name (or `BAD_RESPONSE`).
        requested: Requests the run was asked to send.
        concurrency: Number of client coroutines.
    """

    wall_seconds: float
    latencies: tuple[float, ...]
    errors: Mapping[str, int] = field(default_factory=dict)
    requested: int = 0
    concurrency: int = 1

    @property
    def completed(self) -> int:
        """Successful requests."""
        return len(self.latencies)

    @property
    def failed(self) -> int:
        """Requests that ended in an error."""
        return sum(self.errors.values())

    @property
    def not_sent(self) -> int:
        """Requests never sent because the run's time ran out."""
        return self.requested - self.completed - self.failed

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time (samples/s for 1-sample requests)."""
        return self.completed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile of the successful latencies, nearest rank; NaN when none."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
        return ordered[rank - 1]

    @property
    def p50(self) -> float:
        """Median latency in seconds."""
        return self.percentile(50)

    @property
    def p99(self) -> float:
        """99th-percentile latency in seconds."""
        return self.percentile(99)

    def summary(self) -> str:
        """One line: throughput, p50, p99 and any errors."""
        line = (
            f"{self.completed}/{self.requested} ok at concurrency {self.concurrency}: "
            f"{self.throughput:,.1f} req/s, p50 {self.p50 * 1e3:.1f} ms, "
            f"p99 {self.p99 * 1e3:.1f} ms, wall {self.wall_seconds:.2f} s"
        )
        if self.errors:
            line += f", errors {dict(self.errors)}"
        if self.not_sent:
            line += f", {self.not_sent} not sent (timeout)"
        return line


async def run_closed_loop_async(
    target: str,
    make_call: MakeCall,
    concurrency: int,
    requests: int,
    timeout_s: float,
    *,
    channels: int = 4,
    warmup: int = 0,
) -> LoadResult:
    """`run_closed_loop` inside a running event loop."""
    if concurrency < 1 or requests < 1 or warmup < 0 or channels < 1:
        raise ValueError(
            f"need concurrency, requests, channels >= 1 and warmup >= 0, got {concurrency}, "
            f"{requests}, {channels}, {warmup}"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    loop = asyncio.get_running_loop()
    opened = [
        grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        for _ in range(min(channels, concurrency))
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(channel.channel_ready() for channel in opened)),
            CHANNEL_READY_TIMEOUT_S,
        )
        calls = [make_call(channel) for channel in opened]
        # Warm-up requests (indices after the measured ones) pay for connection and allocator
        # set-up; they are neither timed nor counted.
        for index in range(warmup):
            await calls[index % len(calls)](requests + index, timeout_s)

        latencies: list[float] = []
        errors: Counter[str] = Counter()
        next_index = 0
        deadline = loop.time() + timeout_s

        async def client(call: Call) -> None:
            nonlocal next_index
            # Bounded twice: by the shared request count and by the run's deadline.
            while next_index < requests:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                index, next_index = next_index, next_index + 1
                start = time.perf_counter()
                try:
                    await call(index, remaining)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                except BadResponse:
                    errors[BAD_RESPONSE] += 1
                else:
                    latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client(calls[i % len(calls)]) for i in range(concurrency)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    return LoadResult(
        wall_seconds=wall,
        latencies=tuple(latencies),
        errors=dict(errors),
        requested=requests,
        concurrency=concurrency,
    )


def run_closed_loop(
    target: str,
    make_call: MakeCall,
    concurrency: int,
    requests: int,
    timeout_s: float,
    *,
    channels: int = 4,
    warmup: int = 0,
) -> LoadResult:
    """Drive `target` with `concurrency` back-to-back clients until `requests` are sent.

    Args:
        target: `HOST:PORT` of the gRPC server.
        make_call: Request maker, e.g. `oip_infer(...)` or `flowserve_sample(...)`.
        concurrency: Client coroutines, each with at most one request in flight.
        requests: Requests to send in total (request indices 0 .. requests-1).
        timeout_s: Bound on the measured run; also the deadline of every RPC in it.
        channels: gRPC channels (TCP connections) the clients are spread over.
        warmup: Untimed requests sent one by one before the run.

    Returns:
        The wall time, the latency of every successful request and the errors by status.
    """
    return asyncio.run(
        run_closed_loop_async(
            target, make_call, concurrency, requests, timeout_s, channels=channels, warmup=warmup
        )
    )


def noise_for(index: int, sample_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The standard-normal noise of request `index`, float32 `(1, *sample_shape)`."""
    rng = np.random.default_rng([seed, index])
    return rng.standard_normal((1, *sample_shape)).astype(np.float32)


def oip_infer_request(
    model: str, noise: np.ndarray, parameters: Mapping[str, int | str] | None = None
) -> oip.ModelInferRequest:
    """An OIP `ModelInferRequest` carrying `noise` `(batch, *sample_shape)` as input NOISE.

    Args:
        model: OIP model name.
        noise: float32 noise; sent little-endian, row-major, in `raw_input_contents`.
        parameters: Request parameters; ints go as `int64_param`, strings as `string_param`
            (flowserve's OIP endpoint reads `num_steps` and `solver` from them).
    """
    wire = np.ascontiguousarray(noise, dtype="<f4")
    request = oip.ModelInferRequest(
        model_name=model,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name=NOISE, datatype=FP32, shape=list(wire.shape)
            )
        ],
        raw_input_contents=[wire.tobytes()],
    )
    for name, value in (parameters or {}).items():
        if isinstance(value, str):
            request.parameters[name].string_param = value
        else:
            request.parameters[name].int64_param = int(value)
    return request


def decode_oip_samples(response: oip.ModelInferResponse) -> np.ndarray:
    """The SAMPLES output of an OIP response as a float32 array of its declared shape.

    Raises:
        BadResponse: no SAMPLES output, not FP32, or bytes that do not fill its shape.
    """
    for index, output in enumerate(response.outputs):
        if output.name != SAMPLES:
            continue
        if output.datatype != FP32 or index >= len(response.raw_output_contents):
            raise BadResponse(f"SAMPLES is {output.datatype} or has no raw contents")
        shape = tuple(int(n) for n in output.shape)
        data = response.raw_output_contents[index]
        if len(data) != 4 * math.prod(shape):
            raise BadResponse(f"SAMPLES holds {len(data)} bytes for shape {list(shape)}")
        return np.frombuffer(data, dtype="<f4").reshape(shape)
    raise BadResponse(f"no {SAMPLES} output in the response")


def oip_infer(
    model: str,
    sample_shape: Sequence[int],
    parameters: Mapping[str, int | str] | None = None,
    seed: int = 0,
) -> MakeCall:
    """Request maker: OIP ModelInfer of one sample, NOISE `[1, *sample_shape]` FP32.

    Args:
        model: OIP model name (flowserve: the model name; Triton: the bound name).
        sample_shape: Shape of one sample, e.g. `(2,)`.
        parameters: Request parameters, e.g. `{"num_steps": 100, "solver": "euler"}`; the
            Triton peer accepts these too (and rejects values other than its fixed ones).
        seed: Noise seed; request i sends `noise_for(i % NOISE_POOL, sample_shape, seed)`.
    """
    # Built once: the clients then spend their CPU on gRPC, not on making noise.
    pool = [
        oip_infer_request(model, noise_for(i, sample_shape, seed), parameters)
        for i in range(NOISE_POOL)
    ]
    expected = (1, *sample_shape)

    def make_call(channel: grpc.aio.Channel) -> Call:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        async def call(index: int, timeout_s: float) -> object:
            response = await stub.ModelInfer(pool[index % NOISE_POOL], timeout=timeout_s)
            samples = decode_oip_samples(response)
            if samples.shape != expected:
                raise BadResponse(f"SAMPLES shape {samples.shape}, expected {expected}")
            return samples

        return call

    return make_call


_SOLVERS = {"euler": pb.EULER, "midpoint": pb.MIDPOINT, "heun": pb.HEUN, "rk4": pb.RK4}


def flowserve_sample(model: str, solver: str, steps: int, seed: int = 0) -> MakeCall:
    """Request maker: flowserve.v1 `Generator.Sample` of one sample, seed `seed + index`.

    Args:
        model: flowserve model name.
        solver: ODE solver name (`euler`, `midpoint`, `heun`, `rk4`).
        steps: Solver steps.
        seed: Base seed; the server draws the noise from `seed + index`.
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {solver!r}")
    solver_enum = _SOLVERS[solver]

    def make_call(channel: grpc.aio.Channel) -> Call:
        stub = pb_grpc.GeneratorStub(channel)

        async def call(index: int, timeout_s: float) -> object:
            request = pb.SampleRequest(
                model=model, num_samples=1, num_steps=steps, solver=solver_enum, seed=seed + index
            )
            response = await stub.Sample(request, timeout=timeout_s)
            if list(response.samples.shape[:1]) != [1]:
                raise BadResponse(
                    f"samples shape {list(response.samples.shape)}, expected [1, ...]"
                )
            return response

        return call

    return make_call
