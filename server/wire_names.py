"""The API's enums <-> the names flows/ and the engine use ("heun", "exact", ...)."""

from __future__ import annotations

from protos.flowserve.v1 import flowserve_pb2 as pb

SOLVER_NAMES: dict[pb.Solver, str] = {
    pb.EULER: "euler",
    pb.MIDPOINT: "midpoint",
    pb.HEUN: "heun",
    pb.RK4: "rk4",
    pb.EULER_MARUYAMA: "euler_maruyama",
}
SOLVER_ENUMS: dict[str, pb.Solver] = {name: value for value, name in SOLVER_NAMES.items()}
ODE_SOLVER_ENUMS: tuple[pb.Solver, ...] = (pb.EULER, pb.MIDPOINT, pb.HEUN, pb.RK4)

ESTIMATOR_NAMES: dict[pb.Estimator, str] = {pb.EXACT: "exact", pb.HUTCHINSON: "hutchinson"}
ESTIMATOR_ENUMS: dict[str, pb.Estimator] = {name: value for value, name in ESTIMATOR_NAMES.items()}


def solver_enum_name(value: pb.Solver) -> str:
    """The proto enum's name of a solver value ("HEUN"), for messages to clients."""
    return str(pb.Solver.Name(value))
