"""Lanes: per model, the row groups of one kind and the network call that serves them.

A sampling call is built in three moves, each O(groups) in Python:

1. `gather(room)` walks the groups round-robin from a cursor and takes each group's pending rows
   of the current stage (a guided row takes two slots); a group larger than the room left is
   split, and the cursor stays on it so that the next call continues where this one stopped.
2. `evaluate(segments)` concatenates the inputs, puts the unconditional copies of guided rows
   after all conditional rows (label = null class), pads to the smallest bucket that fits, calls
   the backend once, combines guidance on the raw predictions with flows.field.guided_combine and
   converts to a velocity with flows.paths (as flows.field.velocity_field does).
3. `scatter(segments, v)` hands every group its slice; groups advance by their tableau.

The likelihood lane does the same without padding or guidance, through the model's eager
(autograd) backend, with divergences from flows.likelihood.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from flows.field import guided_combine
from flows.likelihood import exact_divergence, hutchinson_divergence
from flows.paths import convert_unchecked
from server.engine.api import Backend, ServedModel
from server.engine.groups import STEP_DONE, RowGroup, SampleGroup
from server.engine.likelihood_groups import LikelihoodGroup
from server.engine.records import ModelMath

# Padding rows sit at t = 1/2, where every path's conversions are finite.
_PAD_TIME = 0.5

G = TypeVar("G", bound=RowGroup)


@dataclass(frozen=True)
class Segment(Generic[G]):
    """Rows `[start, start + count)` of one group in one network call."""

    group: G
    start: int
    count: int


class Lane(Protocol):
    """What the engine needs of a lane: gather, evaluate (may raise), scatter, prune."""

    model: ServedModel
    groups: list[Any]

    def gather(self, room: int) -> list[Any]:
        """Segments of the next call, at most `room` network rows."""
        ...

    def evaluate(self, segments: list[Any]) -> tuple[Any, int, int]:
        """Run the call: (outputs, network rows, padded rows)."""
        ...

    def scatter(self, segments: list[Any], outputs: Any) -> list[RowGroup]:
        """Hand out the outputs; return the groups that completed a step."""
        ...

    def prune(self) -> None:
        """Forget groups with no rows left."""
        ...


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= rows (buckets sorted ascending; the last must fit)."""
    index = bisect.bisect_left(buckets, rows)
    if index == len(buckets):
        raise ValueError(f"rows ({rows}) exceed the largest batch bucket ({buckets[-1]})")
    return buckets[index]


def _round_robin(groups: list[G], cursor: int, room: int) -> tuple[list[Segment[G]], int]:
    """Take pending rows from `groups`, starting at `cursor`, until `room` network rows are used.

    Returns:
        (segments, new cursor); the cursor stays on a group that did not fit entirely.
    """
    segments: list[Segment[G]] = []
    count = len(groups)
    index = cursor if cursor < count else 0
    for _ in range(count):
        group = groups[index]
        take = min(group.pending, room // group.width)
        if take == 0:
            break
        segments.append(Segment(group, group.filled, take))
        room -= take * group.width
        if take < group.pending:
            break  # the group continues in the next call
        index = (index + 1) % count
    return segments, index


def _prune(groups: list[G], cursor: int) -> tuple[list[G], int]:
    """Drop empty groups, keeping the cursor on the same group when it survives."""
    if all(g.rows > 0 for g in groups):
        return groups, cursor
    current = groups[cursor] if cursor < len(groups) else None
    kept = [g for g in groups if g.rows > 0]
    return kept, kept.index(current) if current in kept else 0


class SampleLane:
    """The running sampling groups of one model and the network calls that serve them.

    Args:
        model: The served model (its `backend` evaluates the calls).
        math: The model's path, parameterization and classes.
        buckets: Call sizes to pad to.
        device: Device of the inputs.
    """

    def __init__(
        self, model: ServedModel, math: ModelMath, buckets: tuple[int, ...], device: torch.device
    ) -> None:
        self.model = model
        self.backend: Backend = model.backend
        self.math = math
        self.buckets = buckets
        self.device = device
        self.groups: list[SampleGroup] = []
        self._cursor = 0
        self._pads: tuple[Tensor, Tensor, Tensor] | None = None

    def add(self, group: SampleGroup) -> None:
        """Start serving a group."""
        self.groups.append(group)

    def prune(self) -> None:
        """Forget groups that have no rows left."""
        self.groups, self._cursor = _prune(self.groups, self._cursor)

    def gather(self, room: int) -> list[Segment[SampleGroup]]:
        """Choose the rows of the next call, at most `room` network rows (guided rows count 2).

        Returns:
            Segments with guided groups first (their unconditional copies go at the end).
        """
        segments, self._cursor = _round_robin(self.groups, self._cursor, room)
        segments.sort(key=lambda s: s.group.width != 2)
        return segments

    def evaluate(self, segments: list[Segment[SampleGroup]]) -> tuple[Tensor, int, int]:
        """Run one network call for `segments`.

        Returns:
            (velocity `(rows, *sample_shape)` in segment order, network rows, padded rows).
        """
        xs, ts, labels = [], [], []
        for s in segments:
            x_s, t_s, l_s = s.group.inputs(s.start, s.count)
            xs.append(x_s)
            ts.append(t_s)
            labels.append(l_s)
        rows = sum(s.count for s in segments)
        # Guided segments come first, so their conditional rows are [0, uncond) and their
        # unconditional copies go after every conditional row: [rows, rows + uncond).
        guided = [s for s in segments if s.group.width == 2]
        uncond = sum(s.count for s in guided)
        for i, s in enumerate(guided):
            assert s.group.null_labels is not None
            xs.append(xs[i])
            ts.append(ts[i])
            labels.append(s.group.null_labels[s.start : s.start + s.count])
        network_rows = rows + uncond
        padded = bucket_for(network_rows, self.buckets)
        if padded > network_rows:
            pad_x, pad_t, pad_l = self._pad(padded - network_rows)
            xs.append(pad_x)
            ts.append(pad_t)
            labels.append(pad_l)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        t = ts[0] if len(ts) == 1 else torch.cat(ts)
        class_labels = labels[0] if len(labels) == 1 else torch.cat(labels)
        prediction = self.backend(x, t, class_labels)
        if not isinstance(prediction, Tensor) or prediction.shape != x.shape:
            shape = tuple(prediction.shape) if isinstance(prediction, Tensor) else prediction
            raise ValueError(
                f"backend {self.backend.name!r} returned {shape} for input {tuple(x.shape)}"
            )
        if uncond:
            scale = torch.cat([_scale(s) for s in guided])
            # Guide the raw predictions, then convert once, as flows.field.velocity_field does
            # (every conversion is affine in the prediction and the guidance weights sum to 1).
            combined = guided_combine(prediction[:uncond], prediction[rows:network_rows], scale)
            prediction = torch.cat([combined, prediction[uncond:rows]])
        elif padded > rows:
            prediction = prediction[:rows]
        if self.math.parameterization == "velocity":
            return prediction, network_rows, padded
        velocity = convert_unchecked(
            prediction,
            x[:rows],
            self.math.path.schedule(t[:rows]),
            self.math.parameterization,
            "velocity",
        )
        return velocity, network_rows, padded

    def scatter(self, segments: list[Segment[SampleGroup]], velocity: Tensor) -> list[RowGroup]:
        """Hand every segment its velocity rows; return the groups that completed a step."""
        stepped: list[RowGroup] = []
        offset = 0
        for s in segments:
            stop = offset + s.count
            if s.group.accept(s.start, s.count, velocity[offset:stop]) == STEP_DONE:
                stepped.append(s.group)
            offset = stop
        return stepped

    def _pad(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        # One buffer per lane, grown to the largest padding seen and sliced: padding does not
        # allocate in steady state and its memory is bounded by one bucket.
        if self._pads is None or self._pads[0].shape[0] < rows:
            self._pads = (
                torch.zeros((rows, *self.math.sample_shape), device=self.device),
                torch.full((rows,), _PAD_TIME, device=self.device),
                torch.zeros((rows,), dtype=torch.int64, device=self.device),
            )
        pad_x, pad_t, pad_l = self._pads
        return pad_x[:rows], pad_t[:rows], pad_l[:rows]


def _scale(segment: Segment[SampleGroup]) -> Tensor:
    scale = segment.group.scale
    assert scale is not None
    return scale[segment.start : segment.start + segment.count]


class LikelihoodLane:
    """The likelihood groups of one model with one estimator and probe count.

    Calls go through the model's autograd-capable `eager` backend, unpadded (a padded row would
    cost a whole Jacobian). Exact divergences run once per distinct class label in the call:
    flows.likelihood.exact_divergence evaluates single rows under vmap, so a call's label must be
    one constant; unconditional models have one label, hence one call.

    Args:
        model: The served model.
        math: The model's path, parameterization and classes.
        device: Device of the inputs.
    """

    def __init__(self, model: ServedModel, math: ModelMath, device: torch.device) -> None:
        self.model = model
        self.backend: Backend = model.eager
        self.math = math
        self.device = device
        self.groups: list[LikelihoodGroup] = []
        self._cursor = 0

    def add(self, group: LikelihoodGroup) -> None:
        """Start serving a group."""
        self.groups.append(group)

    def prune(self) -> None:
        """Forget groups that have no rows left."""
        self.groups, self._cursor = _prune(self.groups, self._cursor)

    def gather(self, room: int) -> list[Segment[LikelihoodGroup]]:
        """Choose the rows of the next call (round-robin, at most `room` rows)."""
        segments, self._cursor = _round_robin(self.groups, self._cursor, room)
        return segments

    def evaluate(
        self, segments: list[Segment[LikelihoodGroup]]
    ) -> tuple[tuple[Tensor, Tensor], int, int]:
        """Velocity `(rows, *sample_shape)` and divergences `(estimates, rows)` of the segments."""
        parts = [s.group.inputs(s.start, s.count) for s in segments]
        x = torch.cat([p[0] for p in parts])
        t = torch.cat([p[1] for p in parts])
        labels = torch.cat([p[2] for p in parts])
        rows = x.shape[0]
        probe_parts = [p[3] for p in parts if p[3] is not None]
        if not probe_parts:
            v, div = self._exact(x, t, labels)
        else:
            probes = torch.cat(probe_parts, 1)
            v, div = hutchinson_divergence(self._velocity_fn(labels), x, t, probes)
        return (v, div), rows, rows

    def _exact(self, x: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        unique = torch.unique(labels).tolist()
        if len(unique) == 1:
            v, div = exact_divergence(self._velocity_fn(None, unique[0]), x, t)
            return v, div.unsqueeze(0)
        v = torch.empty_like(x)
        div = torch.empty((1, x.shape[0]), device=x.device, dtype=x.dtype)
        for label in unique:
            index = (labels == label).nonzero().squeeze(1)
            v_l, div_l = exact_divergence(self._velocity_fn(None, label), x[index], t[index])
            v[index] = v_l
            div[0, index] = div_l
        return v, div

    def _velocity_fn(
        self, labels: Tensor | None, single: int | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """`(x, t) -> v` with one label per row (`labels`) or one for all rows (`single`)."""
        backend, math = self.backend, self.math

        def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
            if labels is None:
                row_labels = torch.full((x.shape[0],), single or 0, dtype=torch.int64)
                row_labels = row_labels.to(x.device)
            else:
                row_labels = labels
            prediction = backend(x, t, row_labels)
            return convert_unchecked(
                prediction, x, math.path.schedule(t), math.parameterization, "velocity"
            )

        return velocity_fn

    def scatter(
        self, segments: list[Segment[LikelihoodGroup]], outputs: tuple[Tensor, Tensor]
    ) -> list[RowGroup]:
        """Hand every segment its velocity and divergence rows."""
        v, div = outputs
        stepped: list[RowGroup] = []
        offset = 0
        for s in segments:
            stop = offset + s.count
            if s.group.accept(s.start, s.count, v[offset:stop], div[:, offset:stop]) == STEP_DONE:
                stepped.append(s.group)
            offset = stop
        return stepped
