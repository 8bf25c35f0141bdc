"""The whole fixed-step sampling loop as one ONNX model: an ONNX Loop with a runtime trip count.

The dynamo exporter unrolls Python loops, so the loop is built here with `onnx.helper` around a
graph the dynamo exporter produced: the *velocity graph*, `(x, t, class_labels, guidance_scale)
-> v`, which holds the network, classifier-free guidance and the path's conversion to velocity
(`flows.field.guided_combine`, `flows.paths.convert_unchecked`). Its nodes are copied into the
Loop body (twice for Heun's second stage, inside an If); its weights stay initializers of the
outer graph, which the body reads from the enclosing scope, so they are stored once.

Sampler model (names in `export.contract`):
- inputs: `x0` float32 `(batch, *sample_shape)` noise at t=0; `num_steps` int64 scalar (the Loop
  trip count; 0 returns x0); `class_labels` int64 `(batch,)` in [0, num_classes] (num_classes =
  null; ignored by unconditional models); `guidance_scale` float32 `(batch,)` (1 = plain
  conditional; ignored by unconditional models); `solver` int64 scalar, a code of
  `SAMPLER_SOLVER_CODES` (0 Euler, 1 Heun; any other value runs Euler).
- output: `x1` float32 `(batch, *sample_shape)`, the sample at t=1.

Step i (0-based) runs at t = i * dt with dt = 1 / num_steps, as `flows.solvers.sample` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
import torch
from onnx import GraphProto, NodeProto, TensorProto, helper
from torch import Tensor, nn

from export.contract import (
    BATCH_AXIS_NAME,
    ONNX_OPSET,
    SAMPLER_INPUT_NAMES,
    SAMPLER_OUTPUT_NAME,
    SAMPLER_SOLVER_CODES,
)
from export.onnx_network import dynamo_export
from flows.field import guided_combine
from flows.paths import GaussianPath, convert_unchecked

_VELOCITY_INPUTS = ("x", "t", "class_labels", "guidance_scale")
_VELOCITY_OUTPUT = "velocity"
_WEIGHT_PREFIX = "weights/"
_NETWORK_PARAMETERIZATIONS = ("velocity", "score", "noise")


class GuidedVelocity(nn.Module):
    """The velocity a sampler integrates: network, guidance, conversion, with no value checks.

    `flows.field.velocity_field` decides whether to guide from the values of the guidance scale,
    which a graph exporter cannot trace; this module always guides a conditional net (w = 1
    gives the conditional velocity) and never an unconditional one.

    Args:
        net: `forward(x, t, class_labels) -> prediction`.
        path: The path the net was trained on.
        parameterization: What the net predicts (`velocity`, `score` or `noise`).
        num_classes: Real classes; 0 for an unconditional net. Label `num_classes` is null.
    """

    def __init__(
        self, net: nn.Module, path: GaussianPath, parameterization: str, num_classes: int
    ) -> None:
        super().__init__()
        self.net = net
        self.path = path
        self.parameterization = parameterization
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor, guidance_scale: Tensor) -> Tensor:
        """Velocity at `(x, t)`.

        Args:
            x: `(batch, *sample_shape)`.
            t: `(batch,)`.
            class_labels: int64 `(batch,)`.
            guidance_scale: float32 `(batch,)`.

        Returns:
            `(batch, *sample_shape)` velocity.
        """
        if self.num_classes > 0:
            null = torch.full_like(class_labels, self.num_classes)
            # Conditional and null rows in one call: (2 * batch, *sample_shape).
            both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
            # Slices, not chunk(2): chunk's guard on 2 * batch makes torch.export specialise.
            batch = x.shape[0]
            pred_cond, pred_uncond = both[:batch], both[batch:]
            prediction = guided_combine(pred_cond, pred_uncond, guidance_scale)
        else:
            prediction = self.net(x, t, class_labels)
        return convert_unchecked(
            prediction, x, self.path.schedule(t), self.parameterization, "velocity"
        )


def _inline(
    graph: GraphProto, prefix: str, bindings: Mapping[str, str]
) -> tuple[list[NodeProto], str]:
    """Copy a graph's nodes with every produced value renamed under `prefix`.

    Args:
        graph: The velocity graph.
        prefix: Unique per copy, so two copies in one scope do not clash.
        bindings: Graph input or initializer name -> the value name it reads in the new scope.

    Returns:
        The nodes and the name of the copy's output.
    """
    names = dict(bindings)
    nodes = []
    for node in graph.node:
        if any(
            attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for attribute in node.attribute
        ):
            raise ValueError(f"velocity graph node {node.name!r} has a subgraph; cannot inline")
        copy = NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        del copy.input[:]
        copy.input.extend(names.get(name, name) if name else "" for name in node.input)
        del copy.output[:]
        for name in node.output:
            if name:
                names[name] = prefix + name
            copy.output.append(names[name] if name else "")
        nodes.append(copy)
    return nodes, names[graph.output[0].name]


def build_sampler_model(
    velocity_model: onnx.ModelProto, sample_shape: Sequence[int]
) -> onnx.ModelProto:
    """Wrap an exported velocity graph in an ONNX Loop over the time grid.

    Args:
        velocity_model: Graph `(x, t, class_labels, guidance_scale) -> velocity` (inputs may be
            missing where unused).
        sample_shape: Shape of one sample.

    Returns:
        The checked sampler ModelProto (see the module docstring for its inputs).
    """
    graph = velocity_model.graph
    weights = {init.name: _WEIGHT_PREFIX + init.name for init in graph.initializer}
    initializers = []
    for init in graph.initializer:
        renamed = TensorProto()
        renamed.CopyFrom(init)
        renamed.name = weights[init.name]
        initializers.append(renamed)

    def velocity(prefix: str, x: str, t: str) -> tuple[list[NodeProto], str]:
        bindings = dict(weights)
        present = {value.name for value in graph.input}
        outer = {"x": x, "t": t, "class_labels": "class_labels", "guidance_scale": "guidance_scale"}
        bindings.update({name: value for name, value in outer.items() if name in present})
        return _inline(graph, prefix, bindings)

    # Heun's second stage, inside If(use_heun): v at the Euler predictor, then the trapezoid.
    heun_nodes, v_next = velocity("stage1/", "x_euler", "t_next")
    heun_branch = helper.make_graph(
        [
            helper.make_node("Add", ["t", "dt"], ["t_next"]),
            *heun_nodes,
            helper.make_node("Add", ["v_t", v_next], ["v_sum"]),
            helper.make_node("Mul", ["half_dt", "v_sum"], ["dx_heun"]),
            helper.make_node("Add", ["x_t", "dx_heun"], ["x_heun"]),
        ],
        "heun_corrector",
        [],
        [helper.make_tensor_value_info("x_heun", TensorProto.FLOAT, None)],
    )
    euler_branch = helper.make_graph(
        [helper.make_node("Identity", ["x_euler"], ["x_euler_out"])],
        "euler",
        [],
        [helper.make_tensor_value_info("x_euler_out", TensorProto.FLOAT, None)],
    )

    stage0_nodes, v_t = velocity("stage0/", "x_t", "t")
    body = helper.make_graph(
        [
            # t = t_start + step * dt for every row, (batch,).
            helper.make_node("Cast", ["step"], ["step_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["step_f", "dt"], ["elapsed"]),
            helper.make_node("Add", ["t_start", "elapsed"], ["t_scalar"]),
            helper.make_node("Mul", ["ones_batch", "t_scalar"], ["t"]),
            *stage0_nodes,
            helper.make_node("Identity", [v_t], ["v_t"]),
            # Euler step, which is also Heun's predictor.
            helper.make_node("Mul", ["dt", "v_t"], ["dx_euler"]),
            helper.make_node("Add", ["x_t", "dx_euler"], ["x_euler"]),
            helper.make_node(
                "If",
                ["use_heun"],
                ["x_next"],
                then_branch=heun_branch,
                else_branch=euler_branch,
            ),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "sampling_step",
        [
            helper.make_tensor_value_info("step", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_next", TensorProto.FLOAT, None),
        ],
    )

    x0, num_steps, class_labels, guidance_scale, solver = SAMPLER_INPUT_NAMES
    scalar = helper.make_tensor
    main_nodes = [
        helper.make_node(
            "Constant", [], ["t_start"], value=scalar("t0", TensorProto.FLOAT, [], [0.0])
        ),
        helper.make_node(
            "Constant", [], ["t_end"], value=scalar("t1", TensorProto.FLOAT, [], [1.0])
        ),
        helper.make_node("Constant", [], ["half"], value=scalar("h", TensorProto.FLOAT, [], [0.5])),
        helper.make_node(
            "Constant",
            [],
            ["heun_code"],
            value=scalar("heun", TensorProto.INT64, [], [SAMPLER_SOLVER_CODES["heun"]]),
        ),
        # dt = (t_end - t_start) / num_steps, computed once outside the loop.
        helper.make_node("Cast", [num_steps], ["num_steps_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["t_end", "t_start"], ["span"]),
        helper.make_node("Div", ["span", "num_steps_f"], ["dt"]),
        helper.make_node("Mul", ["half", "dt"], ["half_dt"]),
        helper.make_node("Shape", [x0], ["batch_shape"], start=0, end=1),
        helper.make_node(
            "ConstantOfShape",
            ["batch_shape"],
            ["ones_batch"],
            value=scalar("one", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("Equal", [solver, "heun_code"], ["use_heun"]),
        helper.make_node("Loop", [num_steps, "", x0], [SAMPLER_OUTPUT_NAME], body=body),
    ]
    state_shape: list[str | int] = [BATCH_AXIS_NAME, *sample_shape]
    main = helper.make_graph(
        main_nodes,
        "flowserve_sampler",
        [
            helper.make_tensor_value_info(x0, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(num_steps, TensorProto.INT64, []),
            helper.make_tensor_value_info(class_labels, TensorProto.INT64, [BATCH_AXIS_NAME]),
            helper.make_tensor_value_info(guidance_scale, TensorProto.FLOAT, [BATCH_AXIS_NAME]),
            helper.make_tensor_value_info(solver, TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info(SAMPLER_OUTPUT_NAME, TensorProto.FLOAT, state_shape)],
        initializer=initializers,
    )
    model = helper.make_model(
        main,
        opset_imports=list(velocity_model.opset_import),
        producer_name="flowserve.export",
    )
    model.ir_version = velocity_model.ir_version
    model.functions.extend(velocity_model.functions)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_sampler_onnx(
    net: nn.Module,
    path: GaussianPath,
    parameterization: str,
    num_classes: int,
    sample_shape: Sequence[int],
    opset: int = ONNX_OPSET,
) -> onnx.ModelProto:
    """Export the whole Euler/Heun sampling loop of a model to one ONNX model.

    Args:
        net: `forward(x, t, class_labels) -> prediction` in `parameterization`.
        path: The model's path.
        parameterization: `velocity`, `score` or `noise`.
        num_classes: Real classes (0 = unconditional).
        sample_shape: Shape of one sample.
        opset: ONNX opset.

    Returns:
        The sampler ModelProto (inputs in the module docstring).
    """
    shape = tuple(sample_shape)
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of ints >= 1, got {shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    if not isinstance(path, GaussianPath):
        raise ValueError(f"path must be a GaussianPath, got {type(path).__name__}")
    if parameterization not in _NETWORK_PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {_NETWORK_PARAMETERIZATIONS}, "
            f"got {parameterization!r}"
        )
    module = GuidedVelocity(net, path, parameterization, num_classes).eval()
    generator = torch.Generator().manual_seed(0)
    # t inside (0, 1) and batch 3: torch.export specialises batches of 0 and 1.
    example = (
        torch.randn((3, *shape), generator=generator),
        torch.full((3,), 0.5),
        torch.zeros(3, dtype=torch.int64),
        torch.full((3,), 2.0),
    )
    velocity_model = dynamo_export(module, example, _VELOCITY_INPUTS, (_VELOCITY_OUTPUT,), opset)
    return build_sampler_model(velocity_model, shape)
