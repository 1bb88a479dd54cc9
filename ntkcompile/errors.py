"""Exceptions raised by ntkcompile.

Every error a user can trigger has its own class, so callers can catch exactly
what they expect, and every message says what was wrong and what to do.
"""


class NTKCompileError(Exception):
    """Base class of every ntkcompile error."""


class UnsupportedOpError(NTKCompileError, NotImplementedError):
    """An op in the traced model has no Tensor Program rule.

    The message names the op, the fx node and the user's source line, and says
    how to register a rule (``ntkcompile.register_elementwise`` for pointwise
    functions, or mark the module as a leaf with a rule).
    """


class TraceError(NTKCompileError):
    """torch.fx could not trace the model (e.g. data-dependent control flow)."""


class WidthInferenceError(NTKCompileError):
    """The width (infinite) axes of the model could not be determined."""


class GIACheckError(NTKCompileError):
    """The program fails the Simple GIA Check (TP II, Sec. 4 / Def. 7.2).

    The NTK then needs terms this design does not compute (e.g. a readout
    weight reused inside the network, or an output without a readout matrix).
    """


class IRError(NTKCompileError):
    """Internal: the Tensor Program IR broke one of its invariants (``ir.verify``).

    This is a bug in ntkcompile or in a user-registered rule, never bad user
    input; the message lists every violation found.
    """


class InputShapeError(NTKCompileError, ValueError):
    """An input does not have the shape the compiled kernel was traced with."""


class NonFiniteInputError(NTKCompileError, ValueError):
    """An input contains NaN or inf."""


class KernelNotPSDError(NTKCompileError, ValueError):
    """A kernel matrix handed to a solve is not positive (semi)definite."""
