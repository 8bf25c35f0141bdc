"""The serving engine: step-level continuous batching of sampling and likelihood requests.

One loop thread owns the device. Every job becomes rows; each iteration gathers the rows that need
a network evaluation from any running jobs (any t, step count, solver, guidance scale), makes one
network call per model, and hands every row its result. Jobs join and leave between iterations.
A lone small request on an idle engine runs its model's exported whole sampling loop in one call.
This package imports no grpc and no prometheus; the server adapts it.
"""

from server.engine.api import (
    Backend,
    EngineConfig,
    EngineObserver,
    EngineStats,
    LikelihoodJob,
    LikelihoodResult,
    Progress,
    SampleJob,
    SampleResult,
    ServedModel,
    WholeLoopSampler,
)
from server.engine.backends import load_backend, load_whole_loop_sampler
from server.engine.engine import Engine
from server.engine.errors import (
    BackendFailed,
    EngineClosed,
    EngineError,
    JobCancelled,
    JobDeadlineExceeded,
    QueueFull,
)
from server.engine.handle import JobHandle

__all__ = [
    "Backend",
    "BackendFailed",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineStats",
    "JobCancelled",
    "JobDeadlineExceeded",
    "JobHandle",
    "LikelihoodJob",
    "LikelihoodResult",
    "Progress",
    "QueueFull",
    "SampleJob",
    "SampleResult",
    "ServedModel",
    "WholeLoopSampler",
    "load_backend",
    "load_whole_loop_sampler",
]
