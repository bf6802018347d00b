"""``gopd_fast.ops.checks``: one set of argument rules, applied by every public entry point of the loss.

A corpus of bad values (non-numbers, bools, NaN/inf, out-of-range) is passed to each number/flag argument of each
entry point; each must raise TypeError (not a number) or ValueError (NaN/inf/range) naming the argument. The classes
must fail at construction, not at the first call.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gopd_fast import FusedLinearKL, fused_linear_kl, fused_linear_logprob, fused_linear_topk_kl
from gopd_fast.compat import LigerFusedLinearJSD, LigerFusedLinearJSDLoss, liger_fused_linear_jsd
from gopd_fast.compat.trl import fused_gkd_loss
from gopd_fast.ops.checks import (
    TEMPERATURE_RANGE,
    check_bias,
    check_bool,
    check_int,
    check_labels,
    check_probability,
    check_real,
    check_temperature,
)

N, D, V = 5, 4, 11


def test_check_real_accepts_real_numbers_of_every_kind():
    for value in (2, 2.0, np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor([2])):
        assert check_real("x", value) == 2.0 and isinstance(check_real("x", value), float)
    assert check_real("x", math.inf, finite=False) == math.inf
    assert check_real("x", 0.0, low=0.0) == 0.0
    with pytest.raises(ValueError, match="x must be > 0"):
        check_real("x", 0.0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match="x must be <= 1"):
        check_real("x", 1.5, high=1.0)


@pytest.mark.parametrize("value,error", [
    ("2", TypeError), (True, TypeError), (None, TypeError), ([1.0], TypeError), (1j, TypeError),
    (torch.tensor([1.0, 2.0]), TypeError), (torch.tensor(True), TypeError), (math.nan, ValueError),
    (math.inf, ValueError), (-math.inf, ValueError), (np.float64("nan"), ValueError),
    (torch.tensor(math.nan), ValueError),
])
def test_check_real_rejects(value, error):
    with pytest.raises(error, match="my_arg"):
        check_real("my_arg", value)


def test_int_bool_probability_temperature_labels_bias():
    assert check_int("n", np.int32(3), low=1) == 3
    for bad in (1.5, "3", True, None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_int("n", 0, low=1)
    assert check_bool("flag", False) is False
    for bad in ("false", 0, None):
        with pytest.raises(TypeError, match="flag must be True or False"):
            check_bool("flag", bad)
    assert check_probability("beta", 1) == 1.0
    with pytest.raises(ValueError, match="beta must be <= 1"):
        check_probability("beta", 1.0000001)
    low, high = TEMPERATURE_RANGE
    assert check_temperature(low) == low and check_temperature(high) == high
    for bad in (low / 2, high * 2, 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be in"):
            check_temperature(bad)
    hidden = torch.zeros(2, 3, 4)
    assert check_labels("labels", torch.zeros(2, 3, dtype=torch.long), hidden).shape == (6,)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        check_labels("labels", torch.zeros(6), hidden)
    with pytest.raises(ValueError, match="labels must have one label per token"):
        check_labels("labels", torch.zeros(5, dtype=torch.long), hidden)
    assert check_bias("b", torch.tensor([0.0, -math.inf])) is True
    assert check_bias("b", torch.tensor([0.0, 1.0])) is False
    with pytest.raises(ValueError, match="b is -inf at every"):
        check_bias("b", torch.full((3,), -math.inf))
    with pytest.raises(ValueError, match=r"b has NaN or \+inf"):
        check_bias("b", torch.tensor([0.0, math.inf]))


# ----------------------------------------------------------------------------------------------------------------
# The corpus, through every entry point
# ----------------------------------------------------------------------------------------------------------------
def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"h_s": torch.randn(N, D, generator=g), "w_s": torch.randn(V, D, generator=g),
            "h_t": torch.randn(N, D + 1, generator=g), "w_t": torch.randn(V, D + 1, generator=g),
            "labels": torch.randint(0, V, (N,), generator=g)}


def _heads():
    return torch.nn.Linear(D, V), torch.nn.Linear(D + 1, V)


def _kl(**kw):
    x = _tensors()
    return fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], backend="chunked", **kw)


def _liger_fn(**kw):
    x = _tensors()
    return liger_fused_linear_jsd(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"], **kw)


def _gkd(**kw):
    x = _tensors()
    return fused_gkd_loss(x["h_s"], x["h_t"], *_heads(), x["labels"], backend="chunked", **kw)


def _logprob(**kw):
    x = _tensors()
    return fused_linear_logprob(x["h_s"], x["w_s"], x["labels"], **kw)


def _topk(**kw):
    x = _tensors()
    ids = torch.arange(3).repeat(N, 1)
    return fused_linear_topk_kl(x["h_s"], x["w_s"], ids, torch.full((N, 3), -2.0), **kw)


ENTRIES = {  # entry point -> (call with keyword overrides, construction-only: True for classes)
    "fused_linear_kl": _kl,
    "FusedLinearKL": lambda **kw: FusedLinearKL(*_heads(), **kw),
    "LigerFusedLinearJSDLoss": lambda **kw: LigerFusedLinearJSDLoss(**kw),
    "liger_fused_linear_jsd": _liger_fn,
    "LigerFusedLinearJSD": lambda **kw: LigerFusedLinearJSD(**kw),
    "fused_gkd_loss": _gkd,
    "fused_linear_logprob": _logprob,
    "fused_linear_topk_kl": _topk,
}
REAL = [("2", TypeError), (True, TypeError), ([1.0], TypeError), (torch.ones(2), TypeError), (math.nan, ValueError),
        (math.inf, ValueError)]
POSITIVE = REAL + [(None, TypeError), (0.0, ValueError), (-1.0, ValueError)]
TEMPERATURE = POSITIVE + [(1e-30, ValueError), (1e30, ValueError)]
PROBABILITY = REAL + [(-0.1, ValueError), (1.5, ValueError)]
INT = [(1.5, TypeError), ("3", TypeError), (True, TypeError)]
FLAG = [("false", TypeError), (1, TypeError), (None, TypeError)]
# per-token weights may be tensors: a tensor of the wrong shape is a shape (Value) error
WEIGHT = [(v, e) for v, e in REAL if not isinstance(v, torch.Tensor)] + [(torch.ones(2), ValueError),
                                                                          (-1.0, ValueError)]
ARGUMENTS = {  # entry point -> {argument: bad values}
    "fused_linear_kl": {"temperature": TEMPERATURE, "jsd_beta": PROBABILITY, "normalizer": REAL + [(0, ValueError)],
                        "reverse_weight": WEIGHT, "chunk_size": INT + [(0, ValueError)],
                        "return_stats": FLAG, "check_finite": FLAG, "truncate_teacher_vocab": FLAG},
    "FusedLinearKL": {"temperature": TEMPERATURE, "jsd_beta": PROBABILITY, "chunk_size": INT, "return_stats": FLAG,
                      "forward_weight": WEIGHT[:-2] + [(-1.0, ValueError)]},  # tensors: checked per call
    "LigerFusedLinearJSDLoss": {"temperature": TEMPERATURE, "beta": PROBABILITY + [(None, TypeError)],
                                "weight_hard_loss": REAL, "weight_soft_loss": REAL, "ignore_index": INT,
                                "chunk_size": INT + [(0, ValueError)], "compiled": FLAG,
                                "return_soft_hard_loss": FLAG},
    "liger_fused_linear_jsd": {"temperature": TEMPERATURE, "beta": PROBABILITY, "weight_soft_loss": REAL},
    "LigerFusedLinearJSD": {"temperature": TEMPERATURE, "jsd_beta": PROBABILITY, "ignore_index": INT},
    "fused_gkd_loss": {"temperature": TEMPERATURE, "beta": PROBABILITY, "ignore_index": INT,
                       "num_items_in_batch": [(v, e) for v, e in REAL if not isinstance(v, torch.Tensor)]
                       + [(0, ValueError), (torch.ones(2), ValueError)]},
    "fused_linear_logprob": {"temperature": TEMPERATURE, "chunk_size": INT + [(0, ValueError)],
                             "token_block": INT, "ignore_index": INT, "return_entropy": FLAG},
    "fused_linear_topk_kl": {"temperature": TEMPERATURE, "teacher_tail_floor": REAL + [(0.0, ValueError),
                                                                                       (1.0, ValueError)],
                             "reverse_weight": WEIGHT, "chunk_size": INT, "token_block": INT,
                             "return_stats": FLAG},
}
CASES = [(entry, arg, i) for entry, args in ARGUMENTS.items() for arg, values in args.items()
         for i in range(len(values))]


@pytest.mark.parametrize("entry,arg,i", CASES, ids=[f"{e}-{a}-{i}" for e, a, i in CASES])
def test_bad_value_is_rejected_naming_the_argument(entry, arg, i):
    value, error = ARGUMENTS[entry][arg][i]
    with pytest.raises(error, match=arg):
        ENTRIES[entry](**{arg: value})


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_good_values_of_every_kind_are_accepted(entry):
    # NumPy and one-element-tensor numbers are numbers; the call (or construction) must succeed
    first = next(iter(ARGUMENTS[entry]))
    assert first == "temperature"
    for value in (np.float32(1.5), torch.tensor(1.5), 2):
        ENTRIES[entry](temperature=value)
