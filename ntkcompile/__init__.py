"""ntkcompile: compile a PyTorch module into its infinite-width NNGP and NTK.

    kfn = ntkcompile.compile(model, W_std=1.5, b_std=0.05)
    k = kfn(x1, x2)          # k.nngp, k.ntk: float64 (N1, N2)
    print(kfn.program)       # the Tensor Program and its evaluators
    traj = ntkcompile.simulate(kfn, x_train, y_train, x_test, loss="mse", lr=1.0, steps=100)

See README.md for the exact parametrization and docs/architecture.md for how it works.
"""
from . import errors
from .compiled import CompiledKernel, Kernels, compile
from .dynamics import simulate
from .errors import (DivergenceError, GIACheckError, InputShapeError, InvalidModelError, IRError,
                     KernelMemoryError, KernelNotPSDError, NonFiniteInputError, NonFiniteKernelError,
                     NonFiniteLossError, NTKCompileError, TraceError, UnsupportedOpError, WidthInferenceError)
from .ops.elementwise import register_elementwise
from .parametrize import ntk_parametrize

__all__ = [
    "compile", "CompiledKernel", "Kernels", "simulate", "ntk_parametrize", "register_elementwise", "errors",
    "NTKCompileError", "UnsupportedOpError", "TraceError", "WidthInferenceError",
    "GIACheckError", "InputShapeError", "NonFiniteInputError", "KernelNotPSDError",
    "DivergenceError", "NonFiniteLossError", "NonFiniteKernelError", "KernelMemoryError", "InvalidModelError",
    "IRError",
]
__version__ = "0.1.0"
