"""Numerical precision of a run (``RunConfig.precision``): float32, tf32 or bf16.

* ``float32`` (default): nothing changes.
* ``tf32``: CUDA matmuls and convolutions may use TensorFloat-32 (10-bit mantissa inputs,
  float32 accumulation) for the whole method (curvature fit, gradients, scoring); the previous
  backend settings are restored afterwards. On a CPU it is a no-op (logged and recorded): CPUs
  have no TF32 units, and leaving the oneDNN settings alone keeps CPU scores bit-identical.
* ``bf16``: per-example gradients (training and query gradients,
  :func:`attribution_core.gradients.per_example_gradients`) are computed under
  ``torch.autocast(device_type, dtype=torch.bfloat16)``: eligible ops (matmuls, convolutions)
  run in bfloat16 (8-bit mantissa), while parameters, the returned gradients ``G: (B, p)``, the
  gradient cache, curvature fits and the scoring matmuls stay float32. Works under
  ``torch.func`` ``vmap(grad(...))`` on CPU and CUDA.

:func:`run_precision` is the scope the pipeline opens around each method; it yields the record
written to the manifest. :func:`gradient_autocast` is what the gradient code enters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Literal

import torch

Precision = Literal["float32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bf16")

log = logging.getLogger(__name__)

_GRADIENT_AUTOCAST: ContextVar[tuple[str, torch.dtype] | None] = ContextVar(
    "attribution_core_gradient_autocast", default=None
)


def _tf32_state() -> dict[str, Any]:
    """The CUDA TF32 switches, read with the API that torch provides (new one if present)."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):  # torch >= 2.9: per-backend precision
        return {"matmul": b.cuda.matmul.fp32_precision, "conv": b.cudnn.conv.fp32_precision}
    return {
        "matmul": b.cuda.matmul.allow_tf32,
        "conv": b.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _set_tf32_state(state: dict[str, Any]) -> None:
    b = torch.backends
    if "float32_matmul_precision" not in state:
        b.cuda.matmul.fp32_precision = state["matmul"]
        b.cudnn.conv.fp32_precision = state["conv"]
        return
    b.cuda.matmul.allow_tf32 = state["matmul"]
    b.cudnn.allow_tf32 = state["conv"]
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])


def _tf32_on() -> dict[str, Any]:
    """The settings that allow TF32 in CUDA matmuls and convolutions."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # the new API only: mixing it with allow_tf32 makes torch refuse to read either
        return {"matmul": "tf32", "conv": "tf32"}
    return {"matmul": True, "conv": True, "float32_matmul_precision": "high"}


@contextmanager
def run_precision(precision: str, device: torch.device | str) -> Iterator[dict[str, Any]]:
    """Apply ``precision`` on ``device`` inside the block; restore everything afterwards.

    Args:
        precision: ``"float32"``, ``"tf32"`` or ``"bf16"``.
        device: the run's device (``tf32`` only acts on CUDA).

    Yields:
        The manifest record: ``{"precision", "applied": bool, "note"}`` (``note`` says what was
        done, or why nothing was).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    record: dict[str, Any] = {"precision": precision, "applied": False, "note": ""}
    if precision == "float32":
        record["note"] = "float32 everywhere"
        yield record
        return
    if precision == "tf32":
        if dev.type != "cuda":
            record["note"] = f"tf32 has no effect on {dev.type}: float32 used (no TF32 units)"
            log.info("precision: %s", record["note"])
            yield record
            return
        saved = _tf32_state()
        _set_tf32_state(_tf32_on())
        record.update(applied=True, note="TF32 allowed in CUDA matmuls and convolutions")
        try:
            yield record
        finally:
            _set_tf32_state(saved)
        return
    token = _GRADIENT_AUTOCAST.set((dev.type, torch.bfloat16))
    record.update(
        applied=True,
        note=f"per-example gradients under torch.autocast({dev.type!r}, bfloat16); gradients, "
        f"curvature and scores stored and computed in float32",
    )
    try:
        yield record
    finally:
        _GRADIENT_AUTOCAST.reset(token)


def gradient_precision() -> str | None:
    """``"bf16"`` inside a bf16 :func:`run_precision` block, else None (for cache keys)."""
    return "bf16" if _GRADIENT_AUTOCAST.get() is not None else None


def gradient_autocast() -> AbstractContextManager[Any]:
    """``torch.autocast(device_type, bfloat16)`` inside a bf16 run, else a no-op context."""
    active = _GRADIENT_AUTOCAST.get()
    if active is None:
        return nullcontext()
    device_type, dtype = active
    return torch.autocast(device_type, dtype=dtype)
