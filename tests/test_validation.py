"""The argument-validation helpers name the argument and what was expected."""

import pytest
import torch

from fastmodels._validation import (
    FLOAT_DTYPES,
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_range,
    check_same_device,
    check_same_dtype,
    check_tensor,
)


def test_named_dims_bind_and_compare():
    dims = {}
    q = torch.zeros(2, 3, 5, 4)
    check_tensor(q, "q", shape=("B", "H", "T", "D"), dims=dims, dtypes=FLOAT_DTYPES)
    assert dims == {"B": 2, "H": 3, "T": 5, "D": 4}
    with pytest.raises(ValueError, match=r"k: expected shape \[B, H, S, D\] with D=4"):
        check_tensor(torch.zeros(2, 3, 7, 6), "k", shape=("B", "H", "S", "D"), dims=dims)
    with pytest.raises(ValueError, match=r"v: expected shape \[B, H, T, D\], got \[2, 3, 5\]"):
        check_tensor(torch.zeros(2, 3, 5), "v", shape=("B", "H", "T", "D"), dims=dims)
    with pytest.raises(ValueError, match="size 2 at dim 1"):
        check_tensor(torch.zeros(4, 3), "x", shape=(None, 2))


def test_types_dtypes_devices():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        check_tensor([1, 2], "x")
    with pytest.raises(TypeError, match=r"tape: expected dtype in \(int64\), got float32"):
        check_tensor(torch.zeros(3), "tape", dtypes=(torch.int64,))
    with pytest.raises(ValueError, match="expected 2 or 3 dimensions"):
        check_tensor(torch.zeros(3), "A", ndim=(2, 3))
    with pytest.raises(ValueError, match="non-empty"):
        check_tensor(torch.zeros(0, 3), "A", allow_empty=False)
    with pytest.raises(ValueError, match="contiguous"):
        check_tensor(torch.zeros(3, 4).t(), "A", contiguous=True)
    with pytest.raises(ValueError, match="on cuda"):
        check_tensor(torch.zeros(3), "A", device="cuda")
    # the argument the expected dtype or device came from is named: the odd one out may be either
    with pytest.raises(TypeError, match=r"k: expected dtype float32 \(the dtype of q\), got float64"):
        check_tensor(torch.zeros(3, dtype=torch.float64), "k", dtypes=(torch.float32,), dtype_of="q")
    with pytest.raises(ValueError, match=r"k: expected a tensor on meta \(the device of q\), got one on cpu"):
        check_tensor(torch.zeros(3), "k", device="meta", device_of="q")
    assert check_same_device(a=torch.zeros(1), b=None, c=torch.zeros(2)) == torch.device("cpu")
    with pytest.raises(TypeError, match=r"b: expected dtype float32 \(the dtype of a\), got float64"):
        check_same_dtype(a=torch.zeros(1), b=torch.zeros(1, dtype=torch.float64))


def test_values():
    with pytest.raises(ValueError, match="idx: expected values >= 0, got a minimum of -1"):
        check_range(torch.tensor([0, -1, 3]), "idx", 0, 5)
    with pytest.raises(ValueError, match="idx: expected values < 3, got a maximum of 3"):
        check_range(torch.tensor([0, 3]), "idx", 0, 3, high_inclusive=False)
    check_range(torch.tensor([], dtype=torch.long), "idx", 0, 0)
    with pytest.raises(ValueError, match="pos: expected finite values"):
        check_finite(torch.tensor([1.0, float("nan")]), "pos")
    with pytest.raises(ValueError, match="rank: expected an int >= 1, got 0"):
        check_int(0, "rank", low=1)
    with pytest.raises(TypeError, match="rank: expected an int, got bool"):
        check_int(True, "rank")
    with pytest.raises(TypeError, match="rank: expected an int, got float"):
        check_int(2.0, "rank")
    with pytest.raises(ValueError, match="eps: expected a number >= 0"):
        check_float(-1.0, "eps", low=0)
    with pytest.raises(ValueError, match="eps: expected a finite number"):
        check_float(float("inf"), "eps")
    assert check_float(None, "scale", allow_none=True) is None
    import numpy as np  # NumPy scalars (sweeps, configs) are numbers; bools and tensors are not

    assert check_float(np.float32(0.5), "eps") == 0.5 and type(check_float(np.int64(2), "eps")) is float
    for bad in (np.bool_(True), torch.tensor(1.0)):
        with pytest.raises(TypeError, match="eps: expected a float"):
            check_float(bad, "eps")
    assert check_bool(False, "flag") is False
    for bad, got in ((1, "int"), (np.bool_(True), "numpy.bool"), (None, "NoneType")):  # NumPy's named as such
        with pytest.raises(TypeError, match=f"flag: expected a bool, got {got}$"):
            check_bool(bad, "flag")
    with pytest.raises(ValueError, match=r"method: expected one of \['a', 'b'\], got 'c'"):
        check_choice("c", "method", ["a", "b"])
