"""Independent oracle: one input's second moment through post-activation residual blocks.

``E[relu(z_0 + relu(z_1 + ... relu(z_k)))^2]`` for independent ``z_i ~ N(0, v_i)``: the
infinite-width NNGP of an input with itself through ``relu(h + W h)`` blocks, a Markov chain
in 1-D.  The law of the inner part is carried on a grid of spacing ``h`` in numpy (masses of
the sampled densities; relu moves the negative half onto the grid point 0, which the grid
holds exactly): ``O(h^2)``, so two spacings extrapolate (Richardson).
"""
from __future__ import annotations

import numpy as np


def relu_chain_second_moment(variances, h, reach=12.0):
    """The moment above for ``variances = (v_0, ..., v_k)``, outermost first, on spacing ``h``."""
    n0 = int(round(reach / h))
    x = (np.arange(2 * n0 + 1) - n0) * h

    def gauss(v):
        return np.exp(-x ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v) * h

    def relu(p):
        p = p.copy()
        p[n0] += p[:n0].sum()
        p[:n0] = 0.0
        return p

    p = relu(gauss(variances[-1]))
    for v in variances[-2:0:-1]:
        p = relu(np.convolve(p, gauss(v), mode="same"))
    p = np.convolve(p, gauss(variances[0]), mode="same")
    return float((p * np.maximum(x, 0.0) ** 2).sum())


def extrapolated(variances, h=2e-3):
    """Richardson of the spacings ``2 h`` and ``h``, and the change between them."""
    coarse, fine = relu_chain_second_moment(variances, 2 * h), relu_chain_second_moment(variances, h)
    return (4 * fine - coarse) / 3, abs(fine - coarse)
