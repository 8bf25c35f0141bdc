"""Exponential moving average of a network's weights (the weights that ship)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Keeps `shadow = decay_n * shadow + (1 - decay_n) * weights` after every optimiser step.

    The effective decay warms up as decay_n = min(decay, (1 + n) / (10 + n)) so that short runs
    are not dominated by the random initialisation (an average over ~1 / (1 - decay) steps
    would otherwise still remember it). Integer buffers are copied, not averaged.

    Args:
        net: the network whose weights to average (read, never modified).
        decay: the long-run decay in [0, 1); 0 copies the weights.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self._shadow = {name: value.detach().clone() for name, value in net.state_dict().items()}
        self._float_names = [
            name for name, value in self._shadow.items() if value.is_floating_point()
        ]
        self._other_names = [name for name in self._shadow if name not in set(self._float_names)]

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Fold the network's current weights into the average."""
        decay = self.current_decay()
        current = net.state_dict()
        # One fused call over all float tensors: per-tensor lerps cost more than the math.
        torch._foreach_lerp_(
            [self._shadow[name] for name in self._float_names],
            [current[name].detach() for name in self._float_names],
            1.0 - decay,
        )
        for name in self._other_names:
            self._shadow[name].copy_(current[name])
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the averaged weights, loadable into the network."""
        return {name: value.clone() for name, value in self._shadow.items()}
