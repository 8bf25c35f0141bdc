"""onnxruntime sessions tuned for serving small flow networks on the CPU.

Small MLP calls are dominated by per-call overhead, so parallelism is kept to the intra-op pool
(inter-op threads only help graphs with independent branches, which ours do not have) and every
graph optimisation is enabled (fuses Gemm + activation, folds the schedule's constants).
"""

from __future__ import annotations

import os

import onnxruntime as ort

DEFAULT_INTRA_OP_THREADS = 2


def session_options(intra_op_threads: int = DEFAULT_INTRA_OP_THREADS) -> ort.SessionOptions:
    """Session options: all graph optimisations, sequential execution, `intra_op_threads`.

    Args:
        intra_op_threads: Threads for one operator, >= 1.

    Returns:
        The options.
    """
    if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int):
        raise ValueError(f"intra_op_threads must be an int >= 1, got {intra_op_threads!r}")
    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be an int >= 1, got {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: unused-input warnings are expected
    return options


def open_session(
    model: bytes | str | os.PathLike[str], intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a serialised model or a model file.

    Args:
        model: The model's bytes or its path.
        intra_op_threads: Threads for one operator.

    Returns:
        The session.
    """
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(
        source, session_options(intra_op_threads), providers=["CPUExecutionProvider"]
    )
