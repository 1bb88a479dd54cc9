"""The IR verifier accepts what the passes build and names what is broken.

Each broken program below is built by hand with ``ir.Builder`` (whose ``make``
interns without checking), so that exactly one invariant is violated.
"""
from fractions import Fraction

import pytest
import torch
from torch import nn

import ntkcompile
from ntkcompile import compiled
from ntkcompile.errors import IRError
from ntkcompile.ir import (Bias, Builder, GBias, GInput, GMatMul, HAtom, Matrix, Program, Readout, Var, Vec)
from ntkcompile.ir.verify import verify
from ntkcompile.ops.elementwise import ELEMENTWISE
from ntkcompile.ops.conv import GConv
from ntkcompile.passes.backward import backward

RELU, TANH = ELEMENTWISE["relu"], ELEMENTWISE["tanh"]


def _program(build, readout_name="out", pool=None, positions=(), fixed_dims=((3,),)):
    """A Program whose readout sees the Vec ``build(b, params)`` returns."""
    b = Builder()
    prm = {"U": b.param(Matrix, name="U", kind="input", W_std=1.0, fan_in=3),
           "W": b.param(Matrix, name="W", kind="hidden", W_std=1.0),
           "b": b.param(Bias, name="b", b_std=0.5)}
    vec = build(b, prm)
    readout = Readout(name=readout_name, W_std=1.0, b_std=0.0, has_bias=False, out_features=1, vec=vec,
                      pool=pool, positions=positions)
    return Program(builder=b.freeze(), readout=readout, fixed_names=("x",), fixed_dims=fixed_dims,
                   prep=None, input_shape=(3,))


def _relu_of(b, var):
    return b.atom_var(b.hatom(b.ecall(RELU, b.eslot(0)), [var]))


def _good(b, prm):
    """relu(U x + b) -> W -> relu -> readout: every parameter used."""
    g = b.var([(b.sconst(1.0), b.make(GInput, prm["U"], 0)), (b.sconst(1.0), b.make(GBias, prm["b"]))])
    h = b.single(_relu_of(b, g))
    return b.single(_relu_of(b, b.atom_var(b.make(GMatMul, prm["W"], h))))


def _problems(program):
    with pytest.raises(IRError) as e:
        verify(program)
    return str(e.value)


def test_a_well_formed_program_and_its_backward_program_pass():
    p = _program(_good)
    assert verify(p) is p
    assert verify(backward(p)) is not None


def test_nested_h_atom_is_refused():
    def build(b, prm):
        h = _relu_of(b, b.atom_var(b.make(GInput, prm["U"], 0)))
        nested = b.make(HAtom, b.ecall(TANH, b.eslot(0)), (h,))        # tanh of an H-var: must be composed
        return b.single(b.atom_var(b.make(GMatMul, prm["W"], b.single(b.atom_var(nested)))))

    p = _program(build)
    assert "slot 0 is not a purely Gaussian Var" in _problems(p)


def test_unsorted_or_duplicate_terms_are_not_canonical():
    def build(b, prm):
        u, bias = b.make(GInput, prm["U"], 0), b.make(GBias, prm["b"])
        w = b.make(GMatMul, prm["W"], b.single(b.atom_var(u)))
        return b.vec([(1, b.make(Var, ((b.sconst(1.0), w), (b.sconst(2.0), bias))))])   # w after bias

    assert "not in canonical order" in _problems(_program(build))


def test_a_zero_coefficient_is_not_canonical():
    def build(b, prm):
        u = b.make(GInput, prm["U"], 0)
        w = b.make(GMatMul, prm["W"], b.single(b.var([(b.sconst(1.0), u), (b.sconst(1.0), b.make(GBias, prm["b"]))])))
        return b.vec([(1, b.make(Var, ((b.sconst(0.0), w),)))])

    assert "coefficient of" in _problems(_program(build))


def test_dangling_nodes_and_unused_parameters():
    def build(b, prm):
        vec = _good(b, prm)
        b.atom_var(b.hatom(b.ecall(TANH, b.eslot(0)), [b.atom_var(b.make(GInput, prm["U"], 0))]))
        return vec

    msg = _problems(_program(build))
    assert "dangling: not reachable from the readout" in msg

    def unused(b, prm):
        b.param(Matrix, name="spare", kind="hidden", W_std=1.0)
        return _good(b, prm)

    assert "'spare' is used by no atom" in _problems(_program(unused))


def test_parameters_must_belong_to_the_program_and_have_the_right_kind():
    def foreign(b, prm):
        other = Builder().param(Matrix, name="W2", kind="hidden", W_std=1.0)
        vec = _good(b, prm)
        return b.single(b.atom_var(b.make(GMatMul, other, vec)))

    assert "'W2' is not in the program" in _problems(_program(foreign))

    def wrong_kind(b, prm):
        vec = _good(b, prm)
        return b.single(_relu_of(b, b.atom_var(b.make(GMatMul, prm["U"], vec))))   # input matrix on a width vector

    msg = _problems(_program(wrong_kind))
    assert "needs a matrix of kind 'hidden'" in msg and "input matrix 'U' is used by" in msg


def test_fixed_input_index_must_exist():
    def build(b, prm):
        g = b.var([(b.sconst(1.0), b.make(GInput, prm["U"], 1)), (b.sconst(1.0), b.make(GBias, prm["b"]))])
        return b.single(_relu_of(b, b.atom_var(b.make(GMatMul, prm["W"], b.single(_relu_of(b, g))))))

    assert "reads fixed input 1 of 1" in _problems(_program(build))


def test_vec_fractions_and_positions():
    def fractions(b, prm):
        vec = _good(b, prm)
        return b.make(Vec, ((Fraction(1, 2), vec.pieces[0][1]), (Fraction(1, 3), vec.pieces[0][1])))

    assert "do not sum to 1" in _problems(_program(fractions))


def test_readout_must_be_fresh_and_see_no_positions():
    assert "readout weight 'W' is also used inside the network" in _problems(_program(_good, readout_name="W"))
    assert "pools positions (4,) of a vector with positions ()" in _problems(
        _program(_good, pool="gap", positions=(4,)))


def test_a_convolution_whose_geometry_does_not_match_its_argument():
    from ntkcompile.ir import ConvGeometry

    def build(b, prm):
        geom = ConvGeometry.make(3, 1, 1, 1, (5,))
        conv = b.param(Matrix, name="C", kind="hidden", W_std=1.0, fan_in=24, geometry=geom)
        return b.single(b.atom_var(b.make(GConv, conv, _good(b, prm))))     # the argument has no positions

    p = _program(build)
    msg = _problems(p)
    assert "convolves a vector with positions () with a geometry for (5,)" in msg
    assert "sees a vector with positions (5,) without pooling them" in msg


def test_children_must_belong_to_the_program_and_come_before_their_parents():
    stranger = Builder()
    lonely = stranger.single(stranger.atom_var(stranger.make(GBias, stranger.param(Bias, name="c", b_std=1.0))))

    def foreign_child(b, prm):
        return b.single(_relu_of(b, b.atom_var(b.make(GMatMul, prm["W"], lonely))))

    msg = _problems(_program(foreign_child))
    assert "which is not part of the program" in msg

    p = _program(_good)
    top = p.readout.vec
    child = top.pieces[0][1]
    object.__setattr__(child, "uid", top.uid + 1)          # forge: the child now comes after its parent
    assert "created after it (not topologically ordered)" in _problems(p)


def test_backward_program_consumers_and_multipliers_are_checked():
    p = backward(_program(_good))
    bw = p.backward
    g = next(iter(bw.consumers))
    bw.consumers[g] = bw.consumers[g] + (g,)           # an atom that consumes nothing
    msg = _problems(p)
    assert "which consumes no vector" in msg
    p = backward(_program(_good))
    p.backward.multipliers.clear()
    assert "has no multiplier" in _problems(p)


def test_an_unfrozen_program_is_refused():
    b = Builder()
    readout = Readout(name="out", W_std=1.0, b_std=0.0, has_bias=False, out_features=1,
                      vec=b.one_vec())
    p = Program(builder=b, readout=readout, fixed_names=(), fixed_dims=(), prep=None, input_shape=())
    assert "not frozen" in _problems(p)


def test_compile_verifies_every_program(monkeypatch):
    """compile() runs the verifier after the backward pass and after planning."""
    seen = []
    monkeypatch.setattr(compiled, "verify", lambda program: seen.append(program) or program)
    ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)))
    assert len(seen) == 2 and seen[0].backward is not None and seen[1].backward.builder.frozen


def test_frozen_builders_refuse_new_nodes():
    kfn = ntkcompile.compile(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    p = kfn._program
    with pytest.raises(IRError, match="frozen"):
        p.builder.econst(123.0)
    with pytest.raises(IRError, match="frozen"):
        p.backward.builder.econst(456.0)
    kfn(torch.randn(2, 3))                               # calling never changes the program
