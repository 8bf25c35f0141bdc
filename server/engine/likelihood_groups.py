"""Likelihood row groups: the augmented ODE d/dt (x, l) = (v, div v) from t=1 back to t=0.

The stage arithmetic is flows.likelihood.likelihood_step's, taken apart so that rows of many
jobs can share network calls: stage inputs and the state update come from the tableau
(flows.solvers.combine_stages), the divergence increment of a step is
`(sum_i b_i * div_i) * dt` as in likelihood_step, and each finished job's estimate comes from
flows.likelihood.finish_likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flows.likelihood import LikelihoodEstimate, finish_likelihood
from flows.solvers import ButcherTableau, stage_time
from server.engine.groups import STAGE_PENDING, STEP_DONE, RowGroup, step_sizes
from server.engine.records import JobRecord, ModelMath
from server.engine.updaters import StateUpdater


class LikelihoodGroup(RowGroup):
    """Likelihood rows of jobs sharing model, solver, estimator and probe count.

    Args:
        records: The likelihood jobs, in admission order.
        tableau: The ODE method.
        updater: Computes the state updates.
        device: Device of the state tensors.
        math: The model's path, parameterization and classes.
    """

    def __init__(
        self,
        records: Sequence[JobRecord],
        tableau: ButcherTableau,
        updater: StateUpdater,
        device: torch.device,
        math: ModelMath,
    ) -> None:
        super().__init__(records, tableau, updater, device)
        self.tableau: ButcherTableau = tableau
        self.math = math
        self.exact = self.records[0].probes is None
        self.dt, self._dt64 = step_sizes(self.records, -1.0, device)
        self.x = torch.cat([r.x_start for r in self.records]).to(device)
        self.labels = torch.cat([r.labels for r in self.records]).to(device)
        # Probes are (num_probes, rows, *sample_shape): rows sit on dimension 1.
        self.probes: Tensor | None = None
        if not self.exact:
            self.probes = torch.cat([r.probes for r in self.records if r.probes is not None], 1)
            self.probes = self.probes.to(device)
        estimates = 1 if self.probes is None else self.probes.shape[0]
        self.integral = torch.zeros((estimates, self.rows), device=device)
        self.watchers = [r for r in self.records if r.on_progress]
        self.ks: list[Tensor] = []
        self.divs: list[Tensor] = []
        self._k_buf: Tensor | None = None
        self._div_buf: Tensor | None = None
        self._start_step()

    def _start_step(self) -> None:
        # Same arithmetic as flows.likelihood.log_likelihood: t = 1 + step * dt in float64.
        if isinstance(self.dt, Tensor):
            t = (1.0 + self.step * self._dt64).to(torch.float32)
        else:
            t = torch.full(
                (self.rows,), 1.0 + self.step * self.dt, dtype=torch.float32, device=self.device
            )
        self._t_step = t
        self.stage_x = self.x
        self.stage_t = self._t_step

    def inputs(self, start: int, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Rows `[start, start + count)`: (x, t, class_labels, probes or None)."""
        stop = start + count
        probes = None if self.probes is None else self.probes[:, start:stop]
        return self.stage_x[start:stop], self.stage_t[start:stop], self.labels[start:stop], probes

    def accept(self, start: int, count: int, v: Tensor, div: Tensor) -> int:
        """Take velocity `(count, *sample_shape)` and divergences `(estimates, count)`.

        Returns:
            STEP_DONE when this completed a step, else STAGE_PENDING.
        """
        if count == self.rows:
            k, d = v, div
        else:
            if self._k_buf is None or self._div_buf is None:
                self._k_buf = torch.empty_like(self.x)
                self._div_buf = torch.empty_like(self.integral)
            self._k_buf[start : start + count] = v
            self._div_buf[:, start : start + count] = div
            k, d = self._k_buf, self._div_buf
        self.filled += count
        if self.filled < self.rows:
            return STAGE_PENDING
        return self._complete_stage(k, d)

    def complete_stage(self) -> int:
        """Finish a stage whose remaining rows all have results after others left mid-stage."""
        assert self._k_buf is not None and self._div_buf is not None
        assert self.filled == self.rows > 0
        return self._complete_stage(self._k_buf, self._div_buf)

    def _complete_stage(self, k: Tensor, d: Tensor) -> int:
        self.filled = 0
        self._k_buf = self._div_buf = None
        self.ks.append(k)
        self.divs.append(d)
        self.stage += 1
        if self.stage < self.num_stages:
            self.stage_x = self.updater.combine(
                self.x, self.dt, self.tableau.a[self.stage], self.ks
            )
            self.stage_t = stage_time(self._t_step, self.tableau.c[self.stage], self.dt)
            return STAGE_PENDING
        # The increment of int div v dt over the step, as in flows.likelihood.likelihood_step.
        terms = [w * d for w, d in zip(self.tableau.b, self.divs, strict=True) if w != 0.0]
        weighted = terms[0]
        for term in terms[1:]:
            weighted = weighted + term
        self.integral += weighted * self.dt
        self.x = self.updater.combine(self.x, self.dt, self.tableau.b, self.ks)
        self.ks, self.divs, self.stage = [], [], 0
        self.step += 1
        self._start_step()
        return STEP_DONE

    def _take_rows(self, index: Tensor) -> None:
        self.x = self.x.index_select(0, index)
        self.labels = self.labels.index_select(0, index)
        self.integral = self.integral.index_select(1, index)
        if self.probes is not None:
            self.probes = self.probes.index_select(1, index)
        if isinstance(self.dt, Tensor):
            self.dt = self.dt.index_select(0, index)
        self._dt64 = self._dt64.index_select(0, index)
        self.ks = [k.index_select(0, index) for k in self.ks]
        self.divs = [d.index_select(1, index) for d in self.divs]
        if self._k_buf is not None and self._div_buf is not None:
            self._k_buf = self._k_buf.index_select(0, index)
            self._div_buf = self._div_buf.index_select(1, index)
        self._t_step = self._t_step.index_select(0, index)
        self.stage_x = self.stage_x.index_select(0, index)
        self.stage_t = self.stage_t.index_select(0, index)

    def remove(self, gone: set[JobRecord]) -> None:
        """Drop the rows of the jobs in `gone` (see RowGroup.remove)."""
        super().remove(gone)
        self.watchers = [r for r in self.watchers if r not in gone]

    def result(self, record: JobRecord) -> LikelihoodEstimate:
        """log_prob, std_error and bits_per_dim of `record`'s rows on the CPU, each `(rows,)`."""
        return finish_likelihood(
            self.x[record.start : record.stop].to("cpu"),
            self.integral[:, record.start : record.stop].to("cpu"),
            exact=self.exact,
        )
