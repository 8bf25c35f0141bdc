"""Export trained models: TorchScript, ONNX (network and whole sampling loop), TorchServe.

`export_model_dir(path, formats)` is the entry point the `make models` pipeline and the
`flowserve export` command call. It is resolved lazily, so that importing a light module such
as `export.contract` (the server does) does not load the ONNX exporter stack. Triton kernels
live in `export.triton_kernels`, which nothing imports eagerly: importing triton fixes its
interpreter mode, and the rest of the project must work without triton.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.model_export import SHIPPED_MAX_DIR_BYTES, ExportError, export_model_dir

__all__ = ["SHIPPED_MAX_DIR_BYTES", "ExportError", "export_model_dir"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from export import model_export

        return getattr(model_export, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
