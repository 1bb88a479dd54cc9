"""Tracing: registered nonlinearities stay one op without torch.fx.wrap (ntkcompile/trace.py)."""
import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile.errors import TraceError
from ntkcompile.passes.lower import is_rule_module
from ntkcompile.trace import trace
from helpers import leaves
from helpers.registry import restore_registry  # noqa: F401  (a fixture)


def ustep(x):
    return (x > 0).to(x.dtype)


def _ustep(x):          # fx's own autowrap skips names with a leading underscore; we do not
    return (x > 0).to(x.dtype)


class _Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.a, self.o, self.body = nn.Linear(3, 8), nn.Linear(8, 1), body

    def forward(self, x):
        return self.o(self.body(self.a(x)))


def _calls(model):
    return [n.target for n in trace(model, is_rule_module).graph.nodes if n.op == "call_function"]


def test_global_closure_attribute_and_module_calls_are_leaves(restore_registry):
    def cstep(x):       # a closure variable of forward below
        return (x > 0).to(x.dtype)

    for fn in (ustep, _ustep, cstep, leaves.half_step):
        ntkcompile.register_elementwise(fn, fn.__name__)

    class Global(_Net):
        def forward(self, x):
            g = self.a(x)
            return self.o(g + ustep(g) + _ustep(g))

    class Closure(_Net):
        def forward(self, x):
            return self.o(cstep(self.a(x)))

    class Module(_Net):
        def forward(self, x):
            return self.o(leaves.half_step(self.a(x)))

    assert ustep in _calls(Global(None)) and _ustep in _calls(Global(None))
    assert cstep in _calls(Closure(None))
    assert leaves.half_step in _calls(Module(None))
    assert ustep in _calls(_Net(ustep))                        # self.body = ustep, a module attribute

    class Optional(_Net):
        def forward(self, x):
            h = self.a(x)
            return self.o(h if self.body is None else self.body(h))

    assert not _calls(Optional(None))                          # self.body = None is left alone
    assert globals()["ustep"] is ustep and leaves.half_step.__name__ == "half_step"   # unpatched after
    x = torch.randn(4, 3, dtype=torch.float64)
    k = ntkcompile.compile(Closure(None))(x)                    # and it compiles, with the leaf's entry
    assert torch.isfinite(k.ntk).all()


def test_a_function_reached_otherwise_says_to_call_fx_wrap(restore_registry):
    ntkcompile.register_elementwise(ustep, "ustep")

    class InList(_Net):
        def forward(self, x):
            return self.o(self.body[0](self.a(x)))

    with pytest.raises(TraceError, match=r"(?s)traced into the registered nonlinearity 'ustep'.*torch\.fx\.wrap\('ustep'\)"):
        ntkcompile.compile(InList([ustep]))
