"""Time-conditioned networks: a plain MLP for vector data and a small U-Net for 8x8 images.

Every net has `forward(x, t, class_labels) -> prediction` with `x` of shape
`(batch, *sample_shape)`, `t` of shape `(batch,)` and `class_labels` int64 of shape `(batch,)`;
the prediction has the shape of `x`. Whether it is a velocity, a score or a noise prediction is
decided by training and recorded in the model directory, not here. Class-conditional nets embed
`num_classes + 1` labels: label `num_classes` is the null class that label dropout trains and
classifier-free guidance queries. Unconditional nets (`num_classes == 0`) ignore the labels.

The forward passes avoid data-dependent Python control flow and in-place updates so that
`torch.jit.script`, `torch.jit.trace` and the ONNX exporter see one fixed graph (batch aside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flows._checks import check_choice

__all__ = [
    "NET_KINDS",
    "ConvUNet8",
    "NetSpec",
    "TimeMLP",
    "build_net",
]


def _check_int(name: str, value: object, minimum: int) -> int:
    """Require an int >= minimum (bools are ints by accident and are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class TimeMLP(nn.Module):
    """MLP on `concat(x, t)` with `depth` SiLU hidden layers of width `hidden`.

    Time enters as one raw input feature: a sinusoidal embedding would cost more than the
    whole 2-D network at serving batch sizes, and a 4x256 MLP resolves t well on its own.
    With `num_classes > 0` a learned class vector is added to the first hidden layer.

    Args:
        dim: data dimension; inputs are `(batch, dim)`.
        hidden: width of every hidden layer.
        depth: number of hidden layers (>= 1).
        num_classes: real classes for conditioning; 0 for an unconditional net.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, num_classes: int = 0) -> None:
        super().__init__()
        self.dim = _check_int("dim", dim, 1)
        self.hidden = _check_int("hidden", hidden, 1)
        self.depth = _check_int("depth", depth, 1)
        self.num_classes = _check_int("num_classes", num_classes, 0)
        self.conditional = num_classes > 0
        self.input_layer = nn.Linear(dim + 1, hidden)
        # Row `num_classes` is the null class. An unconditional net has no table at all, so
        # scripting and export see a net whose labels input is simply unused.
        self.class_embedding = nn.Embedding(num_classes + 1, hidden) if self.conditional else None
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.hidden_layers = nn.Sequential(*layers)
        self.output_layer = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Predict for a batch.

        Args:
            x: `(batch, dim)` float32.
            t: `(batch,)` float32 times in [0, 1].
            class_labels: `(batch,)` int64; ignored by an unconditional net.

        Returns:
            `(batch, dim)` prediction.
        """
        h = self.input_layer(torch.cat([x, t.unsqueeze(1)], dim=1))  # (batch, hidden)
        if self.class_embedding is not None:
            h = h + self.class_embedding(class_labels)
        return self.output_layer(self.hidden_layers(h))  # type: ignore[no-any-return]


class _FourierTime(nn.Module):
    """Fixed sinusoidal features of t at geometric frequencies from 1 to `max_frequency`."""

    def __init__(self, num_features: int, max_frequency: float = 256.0) -> None:
        super().__init__()
        half = num_features // 2
        exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        frequencies = 2.0 * math.pi * max_frequency**exponents
        # A buffer, not a parameter: saved with the weights so exports see the same constants.
        self.frequencies: Tensor
        self.register_buffer("frequencies", frequencies)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.unsqueeze(1) * self.frequencies.unsqueeze(0)  # (batch, half)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (batch, 2 * half)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector added between the convs."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.cond_proj = nn.Linear(cond_dim, out_channels)
        self.norm2 = nn.GroupNorm(min(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )
        self.act = nn.SiLU()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.cond_proj(cond).unsqueeze(-1).unsqueeze(-1)  # (batch, out, 1, 1) broadcast
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h  # type: ignore[no-any-return]


class ConvUNet8(nn.Module):
    """Two-level convolutional U-Net for `(channels, 8, 8)` images with time and class inputs.

    Resolutions 8x8 (width) -> 4x4 (2 * width) -> 2x2 (2 * width) and back, with skip
    connections. Time enters through Fourier features and an MLP; the class embedding
    (`num_classes + 1` rows, the last being the null class) is added to the time embedding.

    Args:
        channels: image channels; inputs are `(batch, channels, 8, 8)`.
        width: channels at 8x8 resolution; must be a multiple of 8 (GroupNorm groups).
        num_classes: real classes for conditioning; 0 for an unconditional net.
    """

    def __init__(self, channels: int = 1, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.channels = _check_int("channels", channels, 1)
        self.width = _check_int("width", width, 8)
        if width % 8 != 0:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm groups), got {width}")
        self.num_classes = _check_int("num_classes", num_classes, 0)
        self.conditional = num_classes > 0
        cond_dim = 4 * width
        groups = 8
        wide = 2 * width

        self.time_features = _FourierTime(width)
        self.time_mlp = nn.Sequential(
            nn.Linear(2 * (width // 2), cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.class_embedding = nn.Embedding(num_classes + 1, cond_dim) if self.conditional else None
        self.act = nn.SiLU()

        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down0 = _ResBlock(width, width, cond_dim, groups)  # 8x8
        self.downsample0 = nn.Conv2d(width, width, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.down1 = _ResBlock(width, wide, cond_dim, groups)  # 4x4
        self.downsample1 = nn.Conv2d(wide, wide, 3, stride=2, padding=1)  # 4x4 -> 2x2
        self.mid0 = _ResBlock(wide, wide, cond_dim, groups)  # 2x2
        self.mid1 = _ResBlock(wide, wide, cond_dim, groups)
        self.upsample1 = nn.ConvTranspose2d(wide, wide, 2, stride=2)  # 2x2 -> 4x4
        self.up1 = _ResBlock(wide + wide, wide, cond_dim, groups)
        self.upsample0 = nn.ConvTranspose2d(wide, wide, 2, stride=2)  # 4x4 -> 8x8
        self.up0 = _ResBlock(wide + width, width, cond_dim, groups)
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor) -> Tensor:
        """Predict for a batch.

        Args:
            x: `(batch, channels, 8, 8)` float32.
            t: `(batch,)` float32 times in [0, 1].
            class_labels: `(batch,)` int64 in [0, num_classes]; ignored when unconditional.

        Returns:
            `(batch, channels, 8, 8)` prediction.
        """
        cond = self.time_mlp(self.time_features(t))  # (batch, cond_dim)
        if self.class_embedding is not None:
            cond = cond + self.class_embedding(class_labels)
        cond = self.act(cond)

        h0 = self.down0(self.conv_in(x), cond)  # (batch, width, 8, 8)
        h1 = self.down1(self.downsample0(h0), cond)  # (batch, wide, 4, 4)
        h = self.downsample1(h1)  # (batch, wide, 2, 2)
        h = self.mid1(self.mid0(h, cond), cond)
        h = self.up1(torch.cat([self.upsample1(h), h1], dim=1), cond)  # (batch, wide, 4, 4)
        h = self.up0(torch.cat([self.upsample0(h), h0], dim=1), cond)  # (batch, width, 8, 8)
        return self.conv_out(self.act(self.norm_out(h)))  # type: ignore[no-any-return]


NET_KINDS: Mapping[str, type[nn.Module]] = {"time_mlp": TimeMLP, "conv_unet8": ConvUNet8}
_NET_PARAMETERS: Mapping[str, tuple[str, ...]] = {
    "time_mlp": ("dim", "hidden", "depth", "num_classes"),
    "conv_unet8": ("channels", "width", "num_classes"),
}
_NET_REQUIRED: Mapping[str, tuple[str, ...]] = {"time_mlp": ("dim",), "conv_unet8": ()}
_NET_DEFAULT_CLASSES: Mapping[str, int] = {"time_mlp": 0, "conv_unet8": 10}
# Ceilings on every architecture argument, far above any model this project serves: a spec is
# read from untrusted config.json files (pushes), and building a net of depth 10**6 would hold
# the server for minutes before the weights could be compared with it.
NET_ARGUMENT_LIMITS: Mapping[str, int] = {
    "dim": 1 << 20,
    "hidden": 1 << 16,
    "depth": 256,
    "num_classes": 1 << 20,
    "channels": 64,
    "width": 4096,
}


@dataclass(frozen=True)
class NetSpec:
    """A network architecture: its kind and constructor arguments (all ints).

    Attributes:
        kind: one of `NET_KINDS` ("time_mlp", "conv_unet8").
        kwargs: constructor keyword arguments; omitted ones take the constructor's defaults.
    """

    kind: str
    kwargs: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, tuple(NET_KINDS))
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"kwargs must be a mapping, got {type(self.kwargs).__name__}")
        allowed = _NET_PARAMETERS[self.kind]
        for key, value in self.kwargs.items():
            if key not in allowed:
                raise ValueError(
                    f"kwargs[{key!r}] is not a {self.kind} argument; allowed: {allowed}"
                )
            _check_int(f"kwargs[{key!r}]", value, 0)
            if value > NET_ARGUMENT_LIMITS[key]:
                raise ValueError(
                    f"kwargs[{key!r}] must be <= {NET_ARGUMENT_LIMITS[key]}, got {value}"
                )
        for key in _NET_REQUIRED[self.kind]:
            if key not in self.kwargs:
                raise ValueError(f"kwargs[{key!r}] is required for kind {self.kind!r}")
        # Freeze a private copy so that later edits to the caller's dict cannot change the spec.
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def num_classes(self) -> int:
        """Real classes the net is conditioned on (0 when unconditional)."""
        return int(self.kwargs.get("num_classes", _NET_DEFAULT_CLASSES[self.kind]))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, `x.shape[1:]`."""
        if self.kind == "time_mlp":
            return (int(self.kwargs["dim"]),)
        return (int(self.kwargs.get("channels", 1)), 8, 8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: `{"kind": ..., "kwargs": {...}}`."""
        return {"kind": self.kind, "kwargs": dict(sorted(self.kwargs.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetSpec:
        """Inverse of `to_dict`; raises ValueError naming a missing or bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"architecture must be an object, got {type(data).__name__}")
        unknown = set(data) - {"kind", "kwargs"}
        if unknown:
            raise ValueError(f"architecture has unknown fields {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("architecture.kind is required")
        return cls(kind=data["kind"], kwargs=data.get("kwargs", {}))


def build_net(spec: NetSpec) -> nn.Module:
    """Construct a freshly initialised network from its spec (uses torch's global RNG)."""
    if not isinstance(spec, NetSpec):
        raise ValueError(f"spec must be a NetSpec, got {type(spec).__name__}")
    return NET_KINDS[spec.kind](**spec.kwargs)
