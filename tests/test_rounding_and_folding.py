"""Channel-rounding helpers (property-based) and BN folding edge cases."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mobileops import reference as ref_blocks
from mobileops.nn import fold_bn_into_conv, make_divisible
from mobileops.yolo import ceil_to_multiple


@given(st.floats(min_value=0.5, max_value=5000, allow_nan=False), st.sampled_from([1, 4, 8, 16]))
def test_make_divisible_properties(value, divisor):
    out = make_divisible(value, divisor)
    assert out % divisor == 0 and out >= divisor
    assert out >= 0.9 * value  # round-down protection
    assert out == ref_blocks.make_divisible(value, divisor)
    assert make_divisible(value, divisor, round_down_protect=False) <= out


@given(st.floats(min_value=0.01, max_value=5000, allow_nan=False))
def test_ceil_to_multiple_is_the_smallest_multiple_not_below(x):
    out = ceil_to_multiple(x, 8)
    assert out % 8 == 0 and out >= x and out - 8 < x


def test_fold_bn_into_conv_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_bn_into_conv(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


def test_fold_bn_into_conv_with_conv_bias_and_no_affine():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(6, affine=False).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fold_bn_into_conv(conv, bn)(x), bn(conv(x)))
