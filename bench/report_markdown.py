"""Markdown pieces of the performance report: tables, targets, and the verdict on each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A performance target: a measured ratio against the threshold it must reach.

    Attributes:
        name: What is compared, e.g. "gRPC / in-process eager loop, batch 4096".
        ratio: The measured ratio (higher is better).
        threshold: The target (met when ratio >= threshold).
        why_missed: When missed: by how much and why, in a sentence or two.
    """

    name: str
    ratio: float
    threshold: float
    why_missed: str = ""

    @property
    def met(self) -> bool:
        """True when the measured ratio reaches the threshold."""
        return self.ratio >= self.threshold

    @property
    def verdict(self) -> str:
        """ "met", or "MISSED by N%" (how far below the threshold the ratio is)."""
        if self.met:
            return "met"
        return f"**MISSED** by {1 - self.ratio / self.threshold:.0%}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    """Every target with its measured ratio and verdict."""
    return table(
        ["target", "measured", "required", "verdict"],
        [(t.name, f"{t.ratio:.2f}x", f">= {t.threshold:g}x", t.verdict) for t in targets],
    )


def missed_notes(targets: Sequence[Target]) -> str:
    """The explanation of every missed target, as a bullet list ('' when all are met)."""
    return "\n".join(f"- {t.name}: {t.why_missed}" for t in targets if not t.met and t.why_missed)


def rate(value: float) -> str:
    """A throughput figure with thousands separators and sensible precision."""
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
