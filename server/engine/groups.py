"""Row groups: the rows of jobs that move in lockstep, with their solver state.

Jobs admitted in the same iteration, on the same model, with the same solver (and, for sampling,
the same guided-or-not width) share one group: their rows sit at the same solver stage, so the
group keeps one state tensor `(rows, *sample_shape)` and the loop pays Python overhead per group,
not per row. Jobs in a group may differ in step count (one dt per row) and leave it when their
last step is done, when cancelled, or when they fail. A sampling group at a step boundary also
takes in newly admitted jobs (`SampleGroup.join`): their rows start their own step 0 there, with
their own time per row. Without that, requests arriving one by one would each form a group of
one row, and the loop's Python work per group would cost more than the network call.

A stage is evaluated in one or more network calls ("chunks"): rows `[0, filled)` have their
stage result, rows `[filled, rows)` still need it. When the last chunk lands the group advances
by the tableau: the next stage's input, or the step's result.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from flows.paths import GaussianPath
from flows.solvers import ButcherTableau, gaussian_diffusion, gaussian_sde_drift, stage_time
from server.engine.records import JobRecord
from server.engine.updaters import StateUpdater

# Results of `accept`: nothing to do, or a whole step completed (progress and finishers).
STAGE_PENDING = 0
STEP_DONE = 1


def step_sizes(
    records: Sequence[JobRecord], direction: float, device: torch.device
) -> tuple[float | Tensor, Tensor]:
    """The step of each row: a float when all jobs share a step count, else `(rows,)`.

    Args:
        records: The group's jobs, in row order.
        direction: 1.0 (sampling, t: 0 -> 1) or -1.0 (likelihood, t: 1 -> 0).
        device: Device of the returned tensors.

    Returns:
        (dt as the updates use it, float32 `(rows,)` unless uniform; dt of each row in float64,
        so that stage times are computed as flows' drivers compute them, `t0 + i * dt`).
    """
    counts = {r.num_steps for r in records}
    dt64 = torch.cat(
        [torch.full((r.rows,), direction / r.num_steps, dtype=torch.float64) for r in records]
    ).to(device)
    if len(counts) == 1:
        return direction / counts.pop(), dt64
    return dt64.float(), dt64


class RowGroup(ABC):
    """Membership and chunk bookkeeping shared by sampling and likelihood groups.

    Args:
        records: The jobs, in admission order; each gets rows `[start, stop)`.
        tableau: The Runge-Kutta method (None for Euler-Maruyama: one evaluation a step).
        updater: Computes the solver updates.
        device: Device of the state tensors.
    """

    width = 1
    # Jobs with a progress callback or trajectory, reported after every step.
    watchers: list[JobRecord]

    def __init__(
        self,
        records: Sequence[JobRecord],
        tableau: ButcherTableau | None,
        updater: StateUpdater,
        device: torch.device,
    ) -> None:
        self.records: list[JobRecord] = []
        self.tableau = tableau
        self.num_stages = 1 if tableau is None else tableau.num_stages
        self.updater = updater
        self.device = device
        self.step = 0
        self.stage = 0
        self.filled = 0
        self.rows = 0
        self._assign(list(records))
        # Pending finishers, sorted so the soonest is last (popped in O(1) per step).
        self._finish_order = sorted(self.records, key=_last_step, reverse=True)

    def _assign(self, records: list[JobRecord]) -> None:
        offset = 0
        for record in records:
            record.start, record.stop, record.group = offset, offset + record.rows, self
            offset += record.rows
        self.records, self.rows = records, offset

    @property
    def pending(self) -> int:
        """Rows still waiting for the current stage's evaluation."""
        return self.rows - self.filled

    def due(self) -> list[JobRecord]:
        """Jobs whose last step is done (call after STEP_DONE)."""
        finished: list[JobRecord] = []
        while self._finish_order and _last_step(self._finish_order[-1]) <= self.step:
            finished.append(self._finish_order.pop())
        return finished

    def steps_done(self, record: JobRecord) -> int:
        """Steps `record` has completed in this group."""
        return self.step - record.joined_at

    def remaining_evaluations(self, record: JobRecord) -> int:
        """Network evaluations still owed to `record` by this group (per network row)."""
        per_row = record.width
        done_stages = self.steps_done(record) * self.num_stages + self.stage
        owed = (record.num_steps * self.num_stages - done_stages) * record.rows * per_row
        filled_here = min(max(self.filled - record.start, 0), record.rows)
        return max(owed - filled_here * per_row, 0)

    def remove(self, gone: set[JobRecord]) -> None:
        """Drop the rows of the jobs in `gone`; the rest keep their state bit for bit.

        When the rows that left were the only ones still waiting for the current stage, the
        group is left with `pending == 0` and the caller must call `complete_stage()`.
        """
        leaving = [r for r in gone if r.group is self]
        kept = [r for r in self.records if r not in gone]
        for record in leaving:
            record.group = None
        self._finish_order = [r for r in self._finish_order if r not in gone]
        if not kept:
            self.records, self.rows, self.filled = [], 0, 0
            return
        # A mask costs Python work per leaving job, not per staying one.
        keep = torch.ones(self.rows, dtype=torch.bool)
        for record in leaving:
            keep[record.start : record.stop] = False
        index = keep.nonzero().squeeze(1).to(self.device)
        self.filled = sum(min(max(self.filled - r.start, 0), r.rows) for r in kept)
        self._take_rows(index)
        self._assign(kept)

    @abstractmethod
    def _take_rows(self, index: Tensor) -> None:
        """Keep only the rows `index` of every per-row tensor, in that order."""

    @abstractmethod
    def complete_stage(self) -> int:
        """Finish the current stage once every remaining row has its result (see remove)."""


class SampleGroup(RowGroup):
    """Sampling rows integrating dx/dt = v from t=0 to t=1 (or the Euler-Maruyama SDE).

    Args:
        records: Sample jobs sharing model, solver and guided width.
        tableau: The ODE method, or None for Euler-Maruyama.
        updater: Computes the solver updates.
        device: Device of the state tensors.
        path: The model's path (for the SDE's drift and diffusion).
        null_label: Label of the unconditional evaluation.
    """

    def __init__(
        self,
        records: Sequence[JobRecord],
        tableau: ButcherTableau | None,
        updater: StateUpdater,
        device: torch.device,
        path: GaussianPath,
        null_label: int,
    ) -> None:
        super().__init__(records, tableau, updater, device)
        self.width = self.records[0].width
        self.path = path
        self.dt, self._dt64 = step_sizes(self.records, 1.0, device)
        self.x = torch.cat([r.x_start for r in self.records]).to(device)
        self.labels = torch.cat([r.labels for r in self.records]).to(device)
        self.null_labels: Tensor | None = None
        self.scale: Tensor | None = None
        self._null_label = null_label
        if self.width == 2:
            self.null_labels = torch.full_like(self.labels, null_label)
            self.scale = torch.cat(
                [torch.full((r.rows,), float(_guidance(r))) for r in self.records]
            ).to(device)
        self._diffusion = gaussian_diffusion(path) if tableau is None else None
        self.watchers = [r for r in self.records if r.on_progress or _trajectory_every(r)]
        self.ks: list[Tensor] = []
        self._k_buf: Tensor | None = None
        # Group step at which each row joined, float64 `(rows,)`; None while every row is a
        # founder (joined at step 0), which keeps the common case on the cheaper path.
        self._joined64: Tensor | None = None
        self._start_step()

    def can_join(self) -> bool:
        """True at a step boundary: no stage is half evaluated, so new rows can start here."""
        return self.rows > 0 and self.stage == 0 and self.filled == 0

    def join(self, records: Sequence[JobRecord]) -> None:
        """Take in newly admitted jobs (same model, solver and width); they start at step 0.

        Their rows are appended: the existing rows keep their state bit for bit, and each new
        row runs exactly the steps and times a group of its own would run.
        """
        assert self.can_join() and records
        records = list(records)
        for record in records:
            record.joined_at = self.step
        new_rows = sum(r.rows for r in records)
        float64 = torch.float64
        founders = self._joined64
        if founders is None:
            founders = torch.zeros(self.rows, dtype=float64, device=self.device)
        arrivals = torch.full((new_rows,), float(self.step), dtype=float64, device=self.device)
        self._joined64 = torch.cat([founders, arrivals])
        self.x = torch.cat([self.x, *(r.x_start.to(self.device) for r in records)])
        self.labels = torch.cat([self.labels, *(r.labels.to(self.device) for r in records)])
        if self.null_labels is not None and self.scale is not None:
            null = torch.full((new_rows,), self._null_label, dtype=torch.int64, device=self.device)
            self.null_labels = torch.cat([self.null_labels, null])
            scale = [torch.full((r.rows,), float(_guidance(r))) for r in records]
            self.scale = torch.cat([self.scale, *(s.to(self.device) for s in scale)])
        _, new_dt64 = step_sizes(records, 1.0, self.device)
        self._dt64 = torch.cat([self._dt64, new_dt64])
        self.dt = _uniform_or_rows(self._dt64, {r.num_steps for r in self.records + records})
        self._assign(self.records + records)
        for record in records:
            bisect.insort(self._finish_order, record, key=lambda r: -_last_step(r))
        self.watchers += [r for r in records if r.on_progress or _trajectory_every(r)]
        self._start_step()

    @property
    def t_step(self) -> Tensor:
        """Time of each row at the start of the current step, `(rows,)`."""
        return self._t_step

    def _start_step(self) -> None:
        # Same arithmetic as flows.solvers.sample: t = step * dt in float64, then float32, where
        # step counts each row's own steps (a joined row started later than the founders).
        if self._joined64 is not None:
            t = ((self.step - self._joined64) * self._dt64).to(torch.float32)
        elif isinstance(self.dt, Tensor):
            t = (self.step * self._dt64).to(torch.float32)
        else:
            t = torch.full(
                (self.rows,), self.step * self.dt, dtype=torch.float32, device=self.device
            )
        self._t_step = t
        self.stage_x = self.x
        self.stage_t = self._t_step

    def inputs(self, start: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """Network inputs of rows `[start, start + count)`: (x, t, class_labels)."""
        stop = start + count
        return self.stage_x[start:stop], self.stage_t[start:stop], self.labels[start:stop]

    def accept(self, start: int, count: int, v: Tensor) -> int:
        """Take the velocity of rows `[start, start + count)` for the current stage.

        Returns:
            STEP_DONE when this completed a step, else STAGE_PENDING.
        """
        if count == self.rows:
            k = v
        else:
            if self._k_buf is None:
                self._k_buf = torch.empty_like(self.x)
            self._k_buf[start : start + count] = v
            k = self._k_buf
        self.filled += count
        if self.filled < self.rows:
            return STAGE_PENDING
        return self._complete_stage(k)

    def complete_stage(self) -> int:
        """Finish a stage whose remaining rows all have results after others left mid-stage."""
        assert self._k_buf is not None and self.filled == self.rows > 0
        return self._complete_stage(self._k_buf)

    def _complete_stage(self, k: Tensor) -> int:
        self.filled = 0
        self._k_buf = None
        if self.tableau is None:
            self._sde_step(k)
            return STEP_DONE
        self.ks.append(k)
        self.stage += 1
        if self.stage < self.num_stages:
            # Next stage input: x + dt * sum_j a[stage][j] * k_j at t + c[stage] * dt.
            self.stage_x = self.updater.combine(
                self.x, self.dt, self.tableau.a[self.stage], self.ks
            )
            self.stage_t = stage_time(self._t_step, self.tableau.c[self.stage], self.dt)
            return STAGE_PENDING
        # Step result: x + dt * sum_i b[i] * k_i.
        self.x = self.updater.combine(self.x, self.dt, self.tableau.b, self.ks)
        self.ks, self.stage = [], 0
        self.step += 1
        self._start_step()
        return STEP_DONE

    def _sde_step(self, v: Tensor) -> None:
        assert self._diffusion is not None
        t = self._t_step
        # Drift v + g^2/2 * score from the one velocity output, as flows.solvers does.
        drift = gaussian_sde_drift(v, self.x, t, self.path)
        noise = torch.cat(
            [
                torch.randn((r.rows, *r.math.sample_shape), generator=r.generator)
                for r in self.records
            ]
        ).to(self.device)
        self.x = self.updater.euler_maruyama(self.x, t, self.dt, drift, self._diffusion(t), noise)
        self.step += 1
        self._start_step()

    def _take_rows(self, index: Tensor) -> None:
        self.x = self.x.index_select(0, index)
        self.labels = self.labels.index_select(0, index)
        if self.null_labels is not None and self.scale is not None:
            self.null_labels = self.null_labels.index_select(0, index)
            self.scale = self.scale.index_select(0, index)
        if isinstance(self.dt, Tensor):
            self.dt = self.dt.index_select(0, index)
        self._dt64 = self._dt64.index_select(0, index)
        if self._joined64 is not None:
            self._joined64 = self._joined64.index_select(0, index)
        self.ks = [k.index_select(0, index) for k in self.ks]
        if self._k_buf is not None:
            self._k_buf = self._k_buf.index_select(0, index)
        self._t_step = self._t_step.index_select(0, index)
        self.stage_x = self.stage_x.index_select(0, index)
        self.stage_t = self.stage_t.index_select(0, index)

    def remove(self, gone: set[JobRecord]) -> None:
        """Drop the rows of the jobs in `gone` (see RowGroup.remove)."""
        super().remove(gone)
        self.watchers = [r for r in self.watchers if r not in gone]

    def result(self, record: JobRecord) -> Tensor:
        """The current x of `record`'s rows on the CPU, `(rows, *sample_shape)`."""
        return self.x[record.start : record.stop].to("cpu", copy=True)


def _last_step(record: JobRecord) -> int:
    """The group step after which `record` is done."""
    return record.joined_at + record.num_steps


def _uniform_or_rows(dt64: Tensor, counts: set[int]) -> float | Tensor:
    """dt as the updates use it: one float when every row has the same step count."""
    if len(counts) == 1:
        return 1.0 / counts.pop()
    return dt64.float()


def _guidance(record: JobRecord) -> float:
    job = record.job
    return float(getattr(job, "guidance_scale", 1.0))


def _trajectory_every(record: JobRecord) -> int:
    return int(getattr(record.job, "trajectory_every", 0))
