"""ONNX export of a network with the dynamo exporter: dynamic batch, one self-contained file.

The graph's inputs are exactly `x`, `t`, `class_labels` and its output `prediction`. An
unconditional net ignores its labels; should the exporter prune that input, it is put back (as
an unused graph input) because the server always feeds it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from export.contract import BATCH_AXIS_NAME, INPUT_NAMES, ONNX_OPSET, OUTPUT_NAME

# Models whose weights exceed this would need external data; ours are far below.
_MAX_SINGLE_FILE_BYTES = 1 << 30


def dynamo_export(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = ONNX_OPSET,
) -> onnx.ModelProto:
    """Export a module with `torch.onnx.export(..., dynamo=True)`, every input's axis 0 dynamic.

    Args:
        module: The module (eval mode); each positional input has a batch axis 0.
        example_inputs: One example per input, batch >= 2 (a batch of 1 would be specialised).
        input_names: Graph input names, in forward order.
        output_names: Graph output names.
        opset: ONNX opset.

    Returns:
        The checked ModelProto.
    """
    batch = torch.export.Dim(BATCH_AXIS_NAME, min=1)
    dynamic_shapes = {name: {0: batch} for name in input_names}
    module.eval()
    with warnings.catch_warnings(), _quiet_exporter_logs():
        # The exporter warns about optional torchvision ops and axis renames; neither matters.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example_inputs,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns an ONNXProgram
    model = program.model_proto
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        # The exporter can fall back to a specialised batch with only a log line; refuse that.
        if not dims or not dims[0].dim_param:
            raise ValueError(f"ONNX export fixed the batch axis of input {value.name!r}")
    if model.ByteSize() > _MAX_SINGLE_FILE_BYTES:
        raise ValueError("model is too large for a single-file ONNX export")
    return model


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Silence torch.onnx's registration log lines (missing torchvision ops) during export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ensure_input(model: onnx.ModelProto, name: str, elem_type: int) -> None:
    """Add a `(batch,)` graph input if the exporter pruned it (it stays unused)."""
    if any(value.name == name for value in model.graph.input):
        return
    model.graph.input.append(helper.make_tensor_value_info(name, elem_type, [BATCH_AXIS_NAME]))


def _order_inputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    by_name = {value.name: value for value in model.graph.input}
    ordered = [by_name[name] for name in names]
    del model.graph.input[:]
    model.graph.input.extend(ordered)


def export_network_onnx(
    net: nn.Module, sample_shape: Sequence[int], opset: int = ONNX_OPSET
) -> onnx.ModelProto:
    """Export a network to ONNX under the contract names, dynamic batch, checked.

    Args:
        net: `forward(x (batch, *sample_shape), t (batch,), class_labels (batch,)) -> prediction`.
        sample_shape: Shape of one sample.
        opset: ONNX opset.

    Returns:
        The ModelProto: inputs `x`, `t`, `class_labels`, output `prediction`.

    Raises:
        ValueError: `net` is not a module or `sample_shape` is not a tuple of positive ints.
    """
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    shape = tuple(sample_shape)
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of ints >= 1, got {shape}")
    # Batch 3: neither 0 nor 1, which torch.export would specialise to a constant.
    generator = torch.Generator().manual_seed(0)
    example = (
        torch.randn((3, *shape), generator=generator),
        torch.rand(3, generator=generator),
        torch.zeros(3, dtype=torch.int64),
    )
    model = dynamo_export(net, example, INPUT_NAMES, (OUTPUT_NAME,), opset)
    _ensure_input(model, "class_labels", TensorProto.INT64)
    _ensure_input(model, "t", TensorProto.FLOAT)
    _order_inputs(model, INPUT_NAMES)
    onnx.checker.check_model(model, full_check=True)
    return model
