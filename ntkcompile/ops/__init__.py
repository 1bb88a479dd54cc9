"""The op library: every op the compiler knows, one file per family.

Each file holds everything about its ops, registered right beside their
definitions into the tables of the stages that need them:

* lowering rules (``passes.lower.rule``): torch module types, functions and
  method names -> Tensor Program IR;
* a new kind of atom, where the op needs one (an ``ir.Atom`` subclass that knows
  its positions and how it prints), with its planning rules
  (``kernels.planner``: ``COVARIANCE``, ``MEAN``, ``ADJOINT``, ``NTK_TERMS``,
  ``READOUT_POOLS``);
* the runtime helpers its plan calls (functions in ``kernels/``).

Importing this package registers everything; docs/architecture.md walks through
adding an op.
"""
from . import activations, arith, attention, compare, concat, conv, linear, maximum, norm, pool, positions, recurrent, reduce, shape  # noqa: F401
from . import batchnorm, blocks, embedding, maxpool, params, posemb, resample, split, stack  # noqa: F401
from . import aten  # noqa: F401  (last: it registers the rules above under their ATen names)
from .elementwise import register_elementwise  # noqa: F401
