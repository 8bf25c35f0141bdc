"""The export contract the server's backends load: file names, tensor names, formats.

Every exported network takes `x` float32 `(batch, *sample_shape)`, `t` float32 `(batch,)` and
`class_labels` int64 `(batch,)` and returns `prediction` float32 `(batch, *sample_shape)` in the
model's own parameterisation; the batch axis is dynamic. The sampler model (`sampler.onnx`) runs
the whole fixed-step sampling loop in one call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

TORCHSCRIPT_FILE = "model.ts"
ONNX_FILE = "model.onnx"
SAMPLER_FILE = "sampler.onnx"
MANIFEST_FILE = "manifest.json"
MAR_FILE = "model.mar"

INPUT_NAMES: tuple[str, str, str] = ("x", "t", "class_labels")
OUTPUT_NAME = "prediction"
BATCH_AXIS_NAME = "batch"

SAMPLER_INPUT_NAMES: tuple[str, ...] = (
    "x0",
    "num_steps",
    "class_labels",
    "guidance_scale",
    "solver",
)
SAMPLER_OUTPUT_NAME = "x1"
# The sampler's `solver` input is an int64 code; the loop body branches on it with an ONNX If.
SAMPLER_SOLVER_CODES: Mapping[str, int] = {"euler": 0, "heun": 1}

# The ONNX opset the dynamo exporter targets; recorded in the manifest.
ONNX_OPSET = 20

# `onnx` writes model.onnx and sampler.onnx; `mar` writes a TorchServe archive.
FORMATS: tuple[str, ...] = ("torchscript", "onnx", "mar")


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise a comma-separated string or a list of format names.

    Args:
        formats: e.g. `"torchscript,onnx"` or `["onnx"]`.

    Returns:
        The distinct formats in `FORMATS` order.

    Raises:
        ValueError: an empty list or an unknown format (the message lists the allowed ones).
    """
    if isinstance(formats, str):
        names = [name.strip() for name in formats.split(",")]
    else:
        names = [str(name).strip() for name in formats]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"formats must name at least one of {FORMATS}")
    unknown = sorted(set(names) - set(FORMATS))
    if unknown:
        raise ValueError(f"formats: unknown format(s) {unknown}; allowed: {list(FORMATS)}")
    return tuple(name for name in FORMATS if name in names)
