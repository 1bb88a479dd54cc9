"""Independent oracle: infinite-width NNGP and NTK of a BatchNorm-ReLU MLP on one batch.

Network (NTK parametrization, no biases, BatchNorm in training mode without affine, eps=0,
biased batch variance), following Yang, "Tensor Programs II" and the NTK4A Batchnorm notebook:
``h_1 = W_1 x / sqrt(d)``; ``y_l = relu(BN(h_l))``; ``h_{l+1} = W_{l+1} y_l / sqrt(n)``;
``f = v . y_L / sqrt(n)``. Everything is numpy/scipy float64 quadrature (no Monte Carlo).

With ``G = I - 11^T/B`` and ``u = G z``, ``relu(bn(z)) = sqrt(B) relu(u) / |u|``, so

* forward, ``z ~ N(0, S)``: using ``1/|u|^2 = int_0^inf exp(-s |u|^2) ds`` and tilting the
  Gaussian, ``E[g(u) exp(-s|u|^2)] = det'(I + 2 s S_G)^{-1/2} E_{u ~ N(0, K_s)}[g(u)]`` with
  ``S_G = G S G``, ``K_s = S_G (I + 2 s S_G)^{-1}`` and det' over the range of ``S_G``::

      V(S) = B int_0^inf det'(I + 2 s S_G)^{-1/2} VReLU(K_s) ds

* backward: the Jacobian of ``relu(bn(z))`` is ``J = sqrt(B)/|u| D (I - Q) G`` with
  ``D = diag(u > 0)``, ``Q = u u^T / |u|^2``. For symmetric ``Delta``, write ``M = D Delta D``,
  ``F(K) = <Delta, VReLU(K)> = E_K[phi]``, ``phi(u) = relu(u)^T Delta relu(u)`` and
  ``H = dF/dK`` (symmetric gradient, ``= E_K[grad grad phi] / 2``). Expanding
  ``(I-Q) M (I-Q)``, using ``1/|u|^(2k) = int s^(k-1) e^(-s|u|^2) ds / (k-1)!`` and Stein's
  lemma (``E[u (Mu)^T] = K H``, ``E[u u^T phi] = K F + 2 K H K``)::

      E[J^T Delta J] = B G { int_0^inf det'(I + 2 s S_G)^{-1/2}
                      [ Delta o Step(K) - s (K H + H K) + s^2/2 (F K + 2 K H K) ] ds } G,   K = K_s

  where ``Step(K)_ij = E[1(u_i>0) 1(u_j>0)] = (pi - t_ij) / (2 pi)`` and, in closed form,
  ``H = Delta o Step(K) + diag_i( sum_{j != i} Delta_ij sqrt(k_jj / k_ii) sin(t_ij) / (2 pi) )``
  (the diagonal term is ``Delta_ij E[relu(u_j) delta(u_i)]``). The integrand is
  ``O(s^{-R/2})`` at large s (R = rank(S_G)), so this is finite only if R >= 3, i.e.
  B >= 4 and, at layer 1, inputs whose centered Gram has rank >= 3 (``E[1/|u|^2]`` diverges
  for a Gaussian in <= 2 dimensions); otherwise a ValueError is raised.

The NTK sums the layers' parameter contributions: ``Theta_ij = <Sigma_{L+1}, E_ij> +
sum_l <Sigma_l, Delta_l^{(ij)}>`` with ``Sigma_1 = X X^T / d``, ``Sigma_{l+1} = V(Sigma_l)``
(both the covariance of ``h_l`` and the Gram of layer l's input), ``Delta_L = E[J^T E_ij J]``
at ``Sigma_L`` and ``Delta_l = E[J^T Delta_{l+1} J]`` at ``Sigma_l``. For the ordered pair
(i, j) the gradient covariance starts at the non-symmetric ``E_ij = e_i e_j^T``; since the
backward map commutes with transposition and every ``Sigma_l`` is symmetric, replacing it by
``(E_ij + E_ji)/2`` (as the notebook does) gives exactly the same ``Theta_ij``.

Integrals are taken in ``r = log s`` (``ds = s dr``) with ``scipy.integrate.quad_vec``
(adaptive Gauss-Kronrod, epsrel 1e-11); with R = rank(S_G) (= B-1 generically) the integrands
decay like ``e^r`` at ``-inf`` and like ``e^{-r R/2}`` (forward) or ``e^{-r (R-2)/2}``
(backward) at ``+inf``, and are cut where they are below ~1e-16 of their bulk.
"""
import numpy as np
from scipy.integrate import quad_vec

_EPSREL = 1e-11


def _centered_eig(S):
    """Eigen-pairs of ``G S G`` on its range (the eigenvalue 0 along ``1`` is dropped)."""
    B = S.shape[0]
    G = np.eye(B) - np.ones((B, B)) / B
    lam, U = np.linalg.eigh(G @ S @ G)
    keep = lam > 1e-12 * lam.max()
    return G, lam[keep], U[:, keep]


def _tilt(lam, U, s):
    """``(det'(I + 2 s S_G)^{-1/2}, K_s)`` for ``S_G = U diag(lam) U^T``."""
    w = 1.0 + 2.0 * s * lam
    return np.exp(-0.5 * np.sum(np.log(w))), (U * (lam / w)) @ U.T


def _angles(K):
    """``(sqrt of the diagonal, t = arccos of the correlations)`` of a covariance K."""
    d = np.sqrt(np.diag(K))
    t = np.arccos(np.clip(K / np.outer(d, d), -1.0, 1.0))
    np.fill_diagonal(t, 0.0)        # exactly: arccos(1 - 1e-16) ~ 1e-8 would add noise
    return d, t


def _vrelu(K):
    """Arc-cosine kernel ``E[relu(u) relu(u)^T]``, ``u ~ N(0, K)``."""
    d, t = _angles(K)
    return np.outer(d, d) * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)


def _integrate(f, lam, decay):
    """``int_0^inf f(s) ds`` as ``int f(e^r) e^r dr`` over the r where it is not negligible:
    the integrand (in r) is ``O(s max(lam))`` at small s and ``O((s min(lam))^-decay)`` at
    large s; both ends are cut where they fall below ~1e-16 of the bulk."""
    lo = -np.log(lam.max()) - 37.0
    hi = -np.log(lam.min()) + 37.0 / decay
    val, _ = quad_vec(lambda r: np.exp(r) * f(np.exp(r)), lo, hi,
                      epsrel=_EPSREL, epsabs=0.0, limit=20000)
    return val


def bn_relu_forward(S):
    """``V(S) = E[relu(bn(z)) relu(bn(z))^T]``, ``z ~ N(0, S)`` (S: B x B)."""
    B = S.shape[0]
    _, lam, U = _centered_eig(S)

    def f(s):
        det, K = _tilt(lam, U, s)
        return det * _vrelu(K)

    V = B * _integrate(f, lam, lam.size / 2)
    return (V + V.T) / 2


def bn_relu_backward(S, Deltas):
    """``E[J^T Delta J]`` for each symmetric ``Delta`` in ``Deltas`` (m, B, B), where J is
    the Jacobian of ``relu(bn(z))``, ``z ~ N(0, S)`` (formula in the module docstring)."""
    B = S.shape[0]
    G, lam, U = _centered_eig(S)
    if lam.size < 3:
        raise ValueError("E[J^T Delta J] is infinite unless rank(G S G) >= 3 (B >= 4)")
    Deltas = np.asarray(Deltas, dtype=np.float64)

    def f(s):
        det, K = _tilt(lam, U, s)
        d, t = _angles(K)
        step = (np.pi - t) / (2 * np.pi)
        side = np.sin(t) * d[None, :] / d[:, None] / (2 * np.pi)     # sqrt(k_jj/k_ii) sin t_ij / 2pi
        F = np.einsum("mij,ij->m", Deltas, _vrelu(K))
        H = Deltas * step
        H[:, np.arange(B), np.arange(B)] += np.einsum("mij,ij->mi", Deltas, side)
        KH = K @ H
        HK = np.swapaxes(KH, 1, 2)                                   # H, K symmetric
        out = Deltas * step - s * (KH + HK) + (s * s / 2) * (F[:, None, None] * K + 2 * KH @ K)
        return det * out

    out = B * (G @ _integrate(f, lam, lam.size / 2 - 1) @ G)
    return (out + np.swapaxes(out, 1, 2)) / 2


def bn_relu_kernels(X: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(nngp, ntk), each (B, B), of the network above on the batch X (B, d)."""
    X = np.asarray(X, dtype=np.float64)
    B, d = X.shape
    if depth < 1:
        raise ValueError("depth must be >= 1")
    Sigmas = [X @ X.T / d]                                          # Sigma_1 .. Sigma_{L+1}
    for _ in range(depth):
        Sigmas.append(bn_relu_forward(Sigmas[-1]))
    nngp = Sigmas[-1]

    # Delta^{(ij)} for every ordered pair, symmetrized: (E_ij + E_ji) / 2, shape (B*B, B, B)
    E = np.einsum("ia,jb->ijab", np.eye(B), np.eye(B)).reshape(B * B, B, B)
    Deltas = (E + np.swapaxes(E, 1, 2)) / 2
    ntk = nngp.copy()                                               # readout v: <Sigma_{L+1}, E_ij>
    for l in range(depth, 0, -1):                                   # layers L .. 1
        Deltas = bn_relu_backward(Sigmas[l - 1], Deltas)            # Delta_l, at Sigma_l
        ntk += np.einsum("mab,ab->m", Deltas, Sigmas[l - 1]).reshape(B, B)
    return nngp, (ntk + ntk.T) / 2
