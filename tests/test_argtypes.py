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
        (argtypes.seed, "0", 0),
        (argtypes.seed, str(2**64 - 1), 2**64 - 1),
        (argtypes.port, "0", 0),
        (argtypes.port, "65535", 65535),
        (argtypes.probability, "0", 0.0),
        (argtypes.probability, "1", 1.0),
        (argtypes.positive_float, "0.5", 0.5),
        (argtypes.timeout_seconds, "0", 0.0),
        (argtypes.timeout_seconds, "0.5", 0.5),
        (argtypes.timeout_seconds, "inf", math.inf),
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
        # mx.random.seed took neither: a traceback from every rank.
        (argtypes.seed, "-1", "expected an integer in 0..18446744073709551615, got '-1'"),
        (argtypes.seed, str(2**64), f"expected an integer in 0..18446744073709551615, got '{2**64}'"),
        # 70000 served on port 4464 (70000 mod 65536).
        (argtypes.port, "70000", "expected a port number in 0..65535, got '70000'"),
        (argtypes.port, "-1", "expected a port number in 0..65535, got '-1'"),
        (argtypes.probability, "1.5", "expected a number in [0, 1], got '1.5'"),
        (argtypes.probability, "nan", "expected a number in [0, 1], got 'nan'"),
        # A negative price per token from `plan --years -1`.
        (argtypes.positive_float, "-1", "expected a number > 0, got '-1'"),
        (argtypes.positive_float, "0", "expected a number > 0, got '0'"),
        (argtypes.positive_float, "inf", "expected a number > 0, got 'inf'"),
        # --timeout 0.001: every rank's watchdog named another rank at once.
        (argtypes.timeout_seconds, "0.001", "expected 0 (no watchdog) or at least 0.5 seconds, got '0.001'"),
        (argtypes.timeout_seconds, "-1", "expected 0 (no watchdog) or at least 0.5 seconds, got '-1'"),
        (argtypes.timeout_seconds, "nan", "expected 0 (no watchdog) or at least 0.5 seconds, got 'nan'"),
    ],
)
def test_rejects_with_the_rule_and_the_text(convert, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        convert(text)
    assert str(info.value) == message or str(info.value).endswith(message)
