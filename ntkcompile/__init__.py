"""ntkcompile: compile a PyTorch module into its infinite-width NNGP and NTK.

    kfn = ntkcompile.compile(model, W_std=1.5, b_std=0.05)
    k = kfn(x1, x2)          # k.nngp, k.ntk: float64 (N1, N2)
    print(kfn.program)       # the Tensor Program and its evaluators

See README.md for the exact parametrization.
"""
from . import errors
from .compiled import CompiledKernel, Kernels, compile
from .errors import (GIACheckError, InputShapeError, KernelNotPSDError, NonFiniteInputError,
                     NTKCompileError, TraceError, UnsupportedOpError, WidthInferenceError)
from .ops.elementwise import register_elementwise
from .parametrize import ntk_parametrize

__all__ = [
    "compile", "CompiledKernel", "Kernels", "ntk_parametrize", "register_elementwise",
    "NTKCompileError", "UnsupportedOpError", "TraceError", "WidthInferenceError",
    "GIACheckError", "InputShapeError", "NonFiniteInputError", "KernelNotPSDError",
]
__version__ = "0.1.0"
