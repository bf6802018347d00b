"""Argument checks shared by every public entry of the loss (``gopd_fast.loss``, ``module``, ``compat``, ``ops``).

One owner per rule: a number argument (temperature, beta, weights, normalisers) goes through ``check_real``, an
integer option through ``check_int``, so every entry point rejects the same bad values with the same message:
a ``TypeError`` for a non-number (a string, a bool, a tensor of several elements, None where a number is required)
and a ``ValueError`` for NaN/inf or a value outside the documented range, naming the argument and the bound.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = ["TEMPERATURE_RANGE", "check_bias", "check_bool", "check_int", "check_labels", "check_probability",
           "check_real", "check_temperature"]

# Temperatures outside this range are rejected rather than computed: below it, z / tau and the 1/tau chain factor
# of the gradients head for float32 overflow (e.g. 1e-30 gave a finite loss with inf gradients); above it both
# distributions are uniform to float32 precision for ordinary logits, so the loss carries no signal.
TEMPERATURE_RANGE = (1e-4, 1e4)


def check_real(name: str, value: object, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """``value`` as a float, or a TypeError/ValueError naming ``name``.

    Accepts Python and NumPy reals and one-element real tensors; rejects bool (``True`` is not a temperature),
    strings and everything else with TypeError. ``low``/``high`` bound the value (inclusive unless ``*_open``).
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{name} must be a real number (or a one-element real tensor), got a tensor of shape "
                            f"{list(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r:.40}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {number}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {number}")
    return number


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """``value`` as an int (Python/NumPy integers, not bool), or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    number = int(value)
    if low is not None and number < low:
        raise ValueError(f"{name} must be >= {low}, got {number}")
    return number


def check_temperature(value: object, name: str = "temperature") -> float:
    """A softmax temperature: a finite real in ``TEMPERATURE_RANGE``."""
    low, high = TEMPERATURE_RANGE
    number = check_real(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}] (outside it the logits or their gradients "
                         f"overflow float32), got {number}")
    return number


def check_probability(name: str, value: object) -> float:
    """A mixing coefficient in [0, 1] (JSD beta, loss weights of that kind)."""
    return check_real(name, value, low=0.0, high=1.0)


def check_bool(name: str, value: object) -> bool:
    """A flag: ``True``/``False`` only (a string such as "false" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
    return value


def check_labels(name: str, labels: object, hidden: Tensor) -> Tensor:
    """An integer label tensor with one entry per token of ``hidden`` ([N, D] or [*B, D]), flattened to [N]."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be an integer tensor [N], got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    n_tokens = hidden.reshape(-1, hidden.shape[-1]).shape[0] if hidden.ndim else 0
    if labels.numel() != n_tokens:
        raise ValueError(f"{name} must have one label per token ({list(hidden.shape[:-1])}), "
                         f"got shape {list(labels.shape)}")
    return labels.reshape(-1)


def check_bias(name: str, bias: Tensor) -> bool:
    """-inf entries mask the vocabulary (see ``gopd_fast.ops``); NaN/+inf are errors, and so is masking every
    entry. Returns whether any entry is masked."""
    if bool(torch.isnan(bias).any() | torch.isposinf(bias).any()):
        raise ValueError(f"{name} has NaN or +inf entries; only -inf is allowed (it masks a vocabulary entry)")
    masked = torch.isneginf(bias)
    if not bool(masked.any()):
        return False
    if bool(masked.all()):
        raise ValueError(f"{name} is -inf at every vocabulary entry: each token's distribution would be empty; "
                         "leave at least one entry unmasked")
    return True
