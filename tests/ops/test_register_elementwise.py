"""register_elementwise: what it checks, and the jumps and kinks it declares or finds."""
import math

import pytest
import torch

from ntkcompile.ops.elementwise import ELEMENTWISE, register_elementwise
from helpers.registry import restore_registry  # noqa: F401  (a fixture)

F64 = torch.float64


def _step_at(t, size=1.0):
    return lambda x: size * (x > t).to(x.dtype)


@pytest.mark.parametrize("fn, smooth, jumps, breaks", [
    (lambda x: torch.nn.functional.softplus(x), True, False, ()),
    (lambda x: torch.clamp(x, min=0.0), False, False, (0.0,)),              # a kink
    (lambda x: torch.clamp(x, -1.0, 1.0), False, False, (-1.0, 1.0)),
    (_step_at(0.0), False, True, (0.0,)),
    (_step_at(0.7), False, True, (0.7,)),
    (lambda x: (x >= -1.3).to(x.dtype), False, True, (-1.3,)),               # the value at t is the right one
    (lambda x: torch.sign(x), False, True, (0.0,)),                          # at t neither: found from both sides
    (lambda x: -1e3 * x + (x > 0.3).to(x.dtype), False, True, (0.3,)),      # a slope that hides it in a cell
    (lambda x: 50 * torch.tanh(x) + 0.01 * (x > 2).to(x.dtype), False, True, (2.0,)),
], ids=["softplus", "relu", "hardtanh", "step", "step(0.7)", "step>=", "sign", "slope", "small"])
def test_jumps_and_kinks_are_found(restore_registry, fn, smooth, jumps, breaks):
    e = register_elementwise(fn, "user")
    assert (e.smooth, e.jumps, e.breaks) == (smooth, jumps, breaks)


def test_declared_jumps_are_checked_against_fn(restore_registry):
    def fn(x):                      # jumps at 0.7 (found) and at 12.5 (outside the scan)
        return (x > 0.7).to(x.dtype) + 2 * (x > 12.5).to(x.dtype)

    assert register_elementwise(fn, "a", jumps=[0.7, 12.5]).breaks == (0.7, 12.5)
    fresh = lambda: (lambda x: fn(x))  # noqa: E731  (each registration needs its own function)
    assert register_elementwise(fresh(), "b", jumps=[(0.7, 1.0), (12.5, 2.0)]).jumps
    for jumps, match in [([(0.7, 2.0), 12.5], "declares a jump of 2 at 0.7, but fn jumps by 1"),
                         ([0.5, 0.7, 12.5], "does not jump there"),
                         ((), "fn also jumps at 0.7"),
                         ([12.5], "fn also jumps at 0.7")]:
        with pytest.raises(ValueError, match=match):
            register_elementwise(fresh(), "c", jumps=jumps)
    for jumps in (True, "0.7", [("a", 1)], [math.nan]):
        with pytest.raises(TypeError, match="jump"):
            register_elementwise(fresh(), "c", jumps=jumps)
    assert "c" not in ELEMENTWISE


def test_smooth_true_with_a_jump_or_kink_is_refused(restore_registry):
    with pytest.raises(ValueError, match="smooth=True, but fn has a jump at 0 .by 1."):
        register_elementwise(_step_at(0.0), "s", smooth=True)
    with pytest.raises(ValueError, match="a kink at 0"):
        register_elementwise(lambda x: torch.clamp(x, min=0.0), "r", smooth=True)
    assert not register_elementwise(lambda x: torch.nn.functional.softplus(x), "sp", smooth=False).smooth


@pytest.mark.parametrize("fn, error, match", [
    (3.0, TypeError, "must be a callable"),
    (lambda x: torch.log(x), ValueError, "returns nan at x = -12"),
    (lambda x: torch.exp(100 * x * x), ValueError, "returns inf at x = -12"),
    (lambda x: x.sum(), ValueError, "same shape"),
    (lambda x: x > 0, ValueError, r"\(x > 0\).to\(x.dtype\)"),
    (lambda x: x.float(), ValueError, "float64"),
    (lambda x: torch.softmax(x.flatten(), 0).reshape(x.shape), ValueError, "not elementwise"),
    (lambda x: x.view(3, -1), ValueError, "failed"),
    (lambda x: torch.tanh(x.float()).double(), ValueError, "float32"),      # rounding: steps everywhere
], ids=["not callable", "nan", "inf", "shape", "bool", "float32 out", "softmax", "raises", "float32 inside"])
def test_bad_functions_are_refused(restore_registry, fn, error, match):
    with pytest.raises(error, match=match):
        register_elementwise(fn, "bad")
    assert "bad" not in ELEMENTWISE


def test_derivative_entry_shares_the_breaks(restore_registry):
    e = register_elementwise(_step_at(0.7), "s")
    d = e.prime()
    assert d.breaks == (0.7,) and d.jumps and not d.smooth
    assert float(d.fn(torch.tensor(0.3, dtype=F64))) == 0.0     # a.e. derivative of a step
