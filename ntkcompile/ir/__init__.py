"""The Tensor Program IR: node types, the interning builder, programs, and the verifier.

``nodes`` (atoms, scalars, expressions, vectors, parameters), ``builder``
(interning and the algebra of canonical forms), ``program`` (forward and
backward programs), ``geometry`` (window geometry of convolutions and pooling),
``elementwise`` (the record of a nonlinearity), ``walk`` (generic walks without
recursion), ``verify`` (the invariants) and ``printer`` (readable text).
"""
from .builder import Builder, expr_has_jump, expr_smooth, expr_uses_slot
from .elementwise import Elementwise
from .geometry import ConvGeometry, PositionMap
from .nodes import (ANY, Atom, Bias, EConst, ECall, ELin, EMul, ESlot, Expr, GBias, GInput, GMatMul, HAtom,
                    Matrix, Node, OfArg, Param, Readout, Scalar, SConst, SMoment, SOp, SSelect, Var, Vec,
                    node)
from .program import READOUT, BackwardProgram, Positions, Program
