"""Choices shared by the configuration and the command line (no heavy imports here)."""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("eager", "torchscript", "onnxruntime", "triton-fused")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
MIB = 1024 * 1024
