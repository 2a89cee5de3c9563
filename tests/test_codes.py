"""Attention terms read from packed codes equal the same terms over the dequantized store."""

import pytest
import torch

from gearfx.compress import quantize
from gearfx.ops import codes
from gearfx.recipes import TensorSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("axis, group", [("channel", 16), ("channel", 64), ("token", 8), ("token", 64)])
def test_codes_terms_equal_dequantized(bits, axis, group):
    g = torch.Generator().manual_seed(bits)
    b, h, heads, t, d = 2, 3, 2, 128, 64
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 3] += 5
    packed, scale, minimum = quantize.quantize(x, bits, axis, group)
    deq = quantize.dequantize(packed, scale, minimum, bits, axis, group)
    spec = TensorSpec(bits, axis, group)
    q = torch.randn(b, h, heads, d, generator=g)
    p = torch.rand(b, h, heads, t, generator=g).softmax(-1)
    torch.testing.assert_close(codes.scores(q, packed, scale, minimum, spec), q @ deq.mT, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(codes.values(p, packed, scale, minimum, spec), p @ deq, rtol=1e-5, atol=1e-5)
