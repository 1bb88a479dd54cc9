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


class InvalidModelError(NTKCompileError, ValueError):
    """The model computes something without a value: a division by the number 0, a
    normalization whose ``eps`` is not a finite number >= 0.  The message names the
    node and the user's source line."""


class IRError(NTKCompileError):
    """Internal: the Tensor Program IR broke one of its invariants (``ir.verify``).

    This is a bug in ntkcompile or in a user-registered rule, never bad user
    input; the message lists every violation found.
    """


class NonFiniteKernelError(NTKCompileError, FloatingPointError):
    """A kernel came out NaN or inf.  The message names the first array of the kernel
    computation that was not finite, the model nodes and source lines it comes from,
    and the likely cause."""


class KernelMemoryError(NTKCompileError, MemoryError):
    """The kernels, or one tile's work, would not fit in the memory available.  Raised
    before allocating; the message says how much is needed and what to do (``out=``
    arrays such as a ``numpy.memmap``, smaller tiles, fewer kernels)."""


class InputShapeError(NTKCompileError, ValueError):
    """An input does not have the shape the compiled kernel was traced with."""


class NonFiniteInputError(NTKCompileError, ValueError):
    """An input contains NaN or inf."""


class KernelNotPSDError(NTKCompileError, ValueError):
    """A kernel matrix handed to a solve is not positive (semi)definite."""


class DivergenceError(NTKCompileError, FloatingPointError):
    """Training dynamics produced NaN or inf: the outputs, the loss or its gradient.

    Raised by ``dynamics.simulate`` and ``harness.train_finite`` at the first
    step where a value is non-finite. The message names the step, the learning
    rate, the batch size and, for the mean MSE, the stability bound (per batch
    ``lr <= |B| out / lambda_max(NTK_BB)``), and says what to do. ``step``
    (0: the initial outputs; ``t``: after ``t`` SGD steps) and ``lr`` hold
    those numbers.
    """

    def __init__(self, message: str, *, step=None, lr=None):
        super().__init__(message)
        self.step = step
        self.lr = lr


class NonFiniteLossError(DivergenceError):
    """A callable loss returned NaN or inf (value or gradient) at finite outputs.

    The loss function, not the learning rate, is then the likely cause (e.g.
    ``log(0)``, ``0/0``, ``sqrt`` at 0); the message names the step and the
    largest output so that overflowing outputs can be told apart.
    """
