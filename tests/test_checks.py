"""The shared input checks: what each accepts, what it returns, and the exact errors."""

import math
import re

import numpy as np
import pytest
import torch

from rlprim import checks


def test_check_tensor_type_and_dimensions():
    x = torch.zeros(2, 3)
    assert checks.check_tensor("x", x, ndim=2) is x
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got list$"):
        checks.check_tensor("x", [1.0])
    for ndim, shape, message in [
        (1, (2, 3), "x must have 1 dimension(s) [B], got shape (2, 3)"),
        (2, (2,), "x must have 2 dimension(s) [B, T], got shape (2,)"),
        (3, (2,), "x must have 3 dimension(s) 3-D, got shape (2,)"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            checks.check_tensor("x", torch.zeros(shape), ndim=ndim)


def test_check_float_tensor_refuses_integers_and_as_float_converts_them():
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        checks.check_float_tensor("x", torch.tensor([1, 2]))
    half = torch.zeros(2, dtype=torch.float16)
    assert checks.check_float_tensor("x", half) is half and checks.as_float(half) is half
    converted = checks.as_float(torch.tensor([1, 2]))
    assert converted.dtype == torch.get_default_dtype() and converted.tolist() == [1.0, 2.0]


def test_check_same_shape_names_both_tensors():
    checks.check_same_shape("a", torch.zeros(2, 3), "b", torch.ones(2, 3))
    message = "a must have the same shape as b (2, 3), got (3, 2)"
    with pytest.raises(ValueError, match=re.escape(message)):
        checks.check_same_shape("a", torch.zeros(3, 2), "b", torch.zeros(2, 3))


def test_check_finite_reports_the_first_bad_value_and_its_index():
    checks.check_finite("x", torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=re.escape("x must be finite, got nan at index (1,)")):
        checks.check_finite("x", torch.tensor([0.0, math.nan, math.inf]))
    with pytest.raises(ValueError, match=re.escape("x must be finite, got inf at index (1, 0)")):
        checks.check_finite("x", torch.tensor([[0.0, 1.0], [math.inf, 2.0]]))
    # Masked-out positions may hold anything (padding).
    x = torch.tensor([[1.0, math.nan], [2.0, -math.inf]])
    checks.check_finite("x", x, mask=torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError, match=re.escape("got -inf at index (1, 1)")):
        checks.check_finite("x", x, mask=torch.tensor([[True, False], [True, True]]))


def test_check_mask_converts_zero_one_masks_to_bool():
    like = torch.zeros(2, 2)
    assert checks.check_mask(None, like, "like").tolist() == [[True, True], [True, True]]
    got = checks.check_mask(torch.tensor([[1, 0], [0, 1]]), like, "like")
    assert got.dtype == torch.bool and got.tolist() == [[True, False], [False, True]]
    message = "mask must contain only 0 and 1 (or be bool), got 2.0 at index (1, 0)"
    with pytest.raises(ValueError, match=re.escape(message)):
        checks.check_mask(torch.tensor([[1.0, 0.0], [2.0, 1.0]]), like, "like")
    message = "mask must have the same shape as like (2, 2), got (2,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        checks.check_mask(torch.ones(2), like, "like")
    with pytest.raises(TypeError, match="mask must be a torch.Tensor, got list"):
        checks.check_mask([1, 0], like, "like")


@pytest.mark.parametrize(
    ("check", "good", "expected", "bad_type", "bad_value", "message"),
    [
        (checks.check_number, -2, -2.0, "1", math.inf, "v must be finite, got inf"),
        (checks.check_nonnegative, 0, 0.0, None, -0.5, "v must be a finite number >= 0, got -0.5"),
        (checks.check_positive, 3, 3.0, True, 0.0, "v must be a finite number > 0, got 0.0"),
        (checks.check_unit_interval, 1, 1.0, "0.5", math.nan, "v must be in [0, 1], got nan"),
    ],
)
def test_number_checks(check, good, expected, bad_type, bad_value, message):
    value = check("v", good)
    assert value == expected and type(value) is float
    with pytest.raises(TypeError, match=f"^v must be .*, got {type(bad_type).__name__}$"):
        check("v", bad_type)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check("v", bad_value)


def test_check_int_accepts_numpy_integers_and_refuses_bools():
    value = checks.check_int("n", np.int64(4), 1)
    assert value == 4 and type(value) is int
    with pytest.raises(TypeError, match="^n must be an int, got bool$"):
        checks.check_int("n", True, 0)
    with pytest.raises(TypeError, match="^n must be an int, got float$"):
        checks.check_int("n", 2.0, 0)
    with pytest.raises(ValueError, match="^n must be >= 1, got 0$"):
        checks.check_int("n", 0, 1)


def test_check_group_size_must_divide_the_batch():
    assert checks.check_group_size(3, 6) == 3
    message = (
        "group_size must divide the batch size 6 (rows of a group are consecutive), "
        "got group_size=4"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        checks.check_group_size(4, 6)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        checks.check_group_size(0, 6)
