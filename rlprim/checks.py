"""Input checks shared by the math modules (advantages, kl, losses, rewards) and batching.

Each check raises a ``TypeError`` or ``ValueError`` that names the argument, says what was
expected and shows what was received, before the caller touches any state; on success it
returns the value, converted where its docstring says so. They are the library's own helpers,
not part of the flat public face (``rlprim.__all__``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "check_tensor",
    "check_float_tensor",
    "as_float",
    "check_same_shape",
    "check_finite",
    "check_mask",
    "check_number",
    "check_nonnegative",
    "check_positive",
    "check_unit_interval",
    "check_int",
    "check_group_size",
]


def check_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    """``x`` itself, after checking it is a ``torch.Tensor`` with ``ndim`` dimensions (if given).

    The error shows the expected layout: ``[B]`` for 1, ``[B, T]`` for 2 dimensions.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        expected = {1: "[B]", 2: "[B, T]"}.get(ndim, f"{ndim}-D")
        raise ValueError(
            f"{name} must have {ndim} dimension(s) {expected}, got shape {tuple(x.shape)}"
        )
    return x


def check_float_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    """``check_tensor``, and the dtype must be floating point (log-probs, advantages, values).

    Integer tensors are refused rather than converted: they would silently lose gradients.
    """
    x = check_tensor(name, x, ndim)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` if floating point, else ``x`` converted to the default float dtype (integer rewards).

    No check: call it on a tensor that ``check_tensor`` accepted.
    """
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``x.shape == ref.shape``; the message names both tensors.

    Both arguments must already be tensors (``check_tensor``).
    """
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, "
            f"got {tuple(x.shape)}"
        )


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raises ``ValueError`` at the first NaN or ±inf of ``x`` (only where ``mask``, if given).

    The message gives the value and its index as a tuple, ``(i,)`` for a 1-D tensor.
    """
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite, got {x[index].item()} at index {index}")


def check_mask(mask: object, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """The mask as a bool tensor on ``like``'s device; ``None`` means every position is valid.

    ``mask`` must have ``like``'s shape and hold only 0 and 1 (any dtype) or be bool; 1 (True)
    marks a valid position.
    """
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    mask = check_tensor("mask", mask)
    check_same_shape("mask", mask, like_name, like)
    if mask.dtype != torch.bool:
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            index = tuple(int(i) for i in (~binary).nonzero()[0])
            raise ValueError(
                f"mask must contain only 0 and 1 (or be bool), got {mask[index].item()} "
                f"at index {index}"
            )
        mask = mask != 0
    return mask.to(like.device)


def check_number(name: str, value: object) -> float:
    """``value`` as a finite Python float; ints and floats only (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a Python float in ``[0, inf)``; NaN, inf and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a non-negative float, got {type(value).__name__}")
    if not (0.0 <= value < math.inf):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    """``value`` as a Python float in ``(0, inf)``; NaN, inf and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not (0.0 < value < math.inf):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_unit_interval(name: str, value: object) -> float:
    """``value`` as a Python float in ``[0, 1]`` (a discount or a GAE λ); NaN is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum``; NumPy integers are accepted, bools refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_group_size(group_size: object, batch_size: int) -> int:
    """``group_size`` as an int ``>= 1`` that divides ``batch_size``.

    Rows of a group are consecutive, so the batch is ``batch_size / group_size`` whole groups.
    """
    group_size = check_int("group_size", group_size, minimum=1)
    if batch_size % group_size != 0:
        raise ValueError(
            f"group_size must divide the batch size {batch_size} (rows of a group are "
            f"consecutive), got group_size={group_size}"
        )
    return group_size
