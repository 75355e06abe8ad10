"""The argparse number types shared by every command (moe_mpi.argtypes)."""

import argparse
import math

import pytest

from moe_mpi import argtypes


@pytest.mark.parametrize(
    "convert, text, value",
    [
        (argtypes.positive_int, "3", 3),
        (argtypes.non_negative_int, "0", 0),
        (argtypes.non_negative_float, "0", 0.0),
        (argtypes.non_negative_float, "inf", math.inf),
        (argtypes.unit_interval, "1", 1.0),
        (argtypes.unit_interval, "0.5", 0.5),
        (argtypes.int_list, "1,8,", [1, 8]),
        (argtypes.float_list, "2, 1,1", [2.0, 1.0, 1.0]),
    ],
)
def test_accepts(convert, text, value):
    assert convert(text) == value


@pytest.mark.parametrize(
    "convert, text, message",
    [
        (argtypes.positive_int, "0", "expected a positive integer, got '0'"),
        (argtypes.positive_int, "1.5", "expected a positive integer, got '1.5'"),
        (argtypes.non_negative_int, "-1", "expected an integer >= 0, got '-1'"),
        (argtypes.non_negative_int, "x", "expected an integer >= 0, got 'x'"),
        (argtypes.non_negative_float, "x", "expected a number, got 'x'"),
        (argtypes.non_negative_float, "-0.1", "expected a number >= 0, got '-0.1'"),
        (argtypes.non_negative_float, "nan", "expected a number >= 0, got 'nan'"),
        (argtypes.unit_interval, "0", "expected a number in (0, 1], got '0'"),
        (argtypes.unit_interval, "nan", "expected a number in (0, 1], got 'nan'"),
        (argtypes.int_list, "1,0", "positive integers such as 1,8, got '1,0'"),
        (argtypes.int_list, ",", "positive integers such as 1,8, got ','"),
        (argtypes.float_list, "2,a", "numbers such as 2,1,1, got '2,a'"),
        (argtypes.float_list, "", "numbers such as 2,1,1, got ''"),
    ],
)
def test_rejects_with_the_rule_and_the_text(convert, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        convert(text)
    assert str(info.value) == message or str(info.value).endswith(message)
