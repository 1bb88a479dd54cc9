"""Spatial stencils: each backward map is the exact adjoint of its forward map.

Oracle: the dot-product test <A(a), d> == <a, A^T(d)> on random arrays, for strides,
paddings (incl. "same"), dilations and 1-D/2-D positions.
"""
import pytest
import torch

from ntkcompile.kernels import spatial as sp

GEOMETRIES = [(3, 1, 1, 1, (8, 8)), (3, 2, 1, 1, (8, 8)), (3, 2, 0, 1, (7, 7)), (2, 2, 0, 1, (6, 6)),
              (3, 1, 2, 2, (9,)), (2, 2, 0, 1, (8,)), (3, 1, "same", 1, (5, 5)), (3, 3, 1, 1, (8, 8))]


@pytest.mark.parametrize("kernel, stride, padding, dilation, shape", GEOMETRIES)
def test_adjoints(kernel, stride, padding, dilation, shape):
    g = sp.ConvGeometry.make(kernel, stride, padding, dilation, shape)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, *shape, *shape, generator=gen, dtype=torch.float64)
    d = torch.randn(3, *g.out_shape, *g.out_shape, generator=gen, dtype=torch.float64)
    a1 = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    d1 = torch.randn(3, *g.out_shape, generator=gen, dtype=torch.float64)
    pairs = [
        ((sp.stencil_pair(a, g) * d).sum(), (a * sp.stencil_pair_adjoint(d, g, (3,))).sum()),
        ((sp.stencil_same(a1, g) * d1).sum(), (a1 * sp.stencil_same_adjoint(d1, g, (3,))).sum()),
        ((sp.pool_pair(a, g) * d).sum(), (a * sp.pool_pair_adjoint(d, g, (3,))).sum()),
    ]
    for lhs, rhs in pairs:
        assert torch.isclose(lhs, rhs, rtol=1e-12, atol=1e-12), (float(lhs), float(rhs))


def test_stencil_pair_matches_direct_sum():
    """``C'(s, t) = (1/|K|) sum_k C(s*stride + k - pad, t*stride + k - pad)`` written out in loops."""
    g = sp.ConvGeometry.make(3, 2, 1, 1, (5,))
    a = torch.randn(2, 5, 5, dtype=torch.float64)
    out = sp.stencil_pair(a, g)
    for s in range(g.out_shape[0]):
        for t in range(g.out_shape[0]):
            want = 0.0
            for k in range(3):
                i, j = 2 * s + k - 1, 2 * t + k - 1
                if 0 <= i < 5 and 0 <= j < 5:
                    want = want + a[:, i, j]
            assert torch.allclose(out[:, s, t], want / 3, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kernel, stride, padding, dilation, shape", GEOMETRIES)
def test_gather_and_scatter_adjoints_agree(kernel, stride, padding, dilation, shape):
    """The compiled path uses a gather, eager a scatter-add: the same map."""
    g = sp.ConvGeometry.make(kernel, stride, padding, dilation, shape)
    d = torch.randn(2, *g.out_shape, *g.out_shape, dtype=torch.float64)
    torch.testing.assert_close(sp._adjoint_gather(d, g, 2), sp._adjoint_windows(d, g, 2), rtol=1e-13, atol=1e-14)
    d1 = torch.randn(2, *g.out_shape, dtype=torch.float64)
    torch.testing.assert_close(sp._adjoint_gather(d1, g, 1), sp._adjoint_windows(d1, g, 1), rtol=1e-13, atol=1e-14)
