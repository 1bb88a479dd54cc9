"""ntkcompile: compile a PyTorch module into its infinite-width NNGP and NTK.

    kfn = ntkcompile.compile(model, W_std=1.5, b_std=0.05)   # an nn.Module or a torch.export program
    k = kfn(x1, x2)          # k.nngp, k.ntk: float64 (N1, N2)
    print(kfn.program)       # the Tensor Program and its evaluators
    kfn.graph("g.svg")       # ... drawn in TP IIb's graphical notation
    traj = ntkcompile.simulate(kfn, x_train, y_train, x_test, loss="mse", lr=1.0, steps=100)

From a shell: ``ntkcompile kernel model.pt2 --x1 x.npy --out k.npz`` (``ntkcompile --help``).
See README.md for the exact parametrization and docs/architecture.md for how it works.
"""
from . import errors
from .compiled import CompiledKernel, Kernels, compile
from .dynamics import (Ensemble, KernelBlocks, Trajectory, kernel_blocks, mse_continuous, mse_discrete,
                       mse_ensemble, mse_infinite, simulate)
from .empirical import empirical_ntk, empirical_outputs
from .errors import (DivergenceError, GIACheckError, InputShapeError, InvalidModelError, IRError,
                     KernelMemoryError, KernelNotPSDError, NonFiniteInputError, NonFiniteKernelError,
                     NonFiniteLossError, NTKCompileError, TraceError, UnsupportedOpError, WidthInferenceError)
from .harness import WidthReport, compare_widths, train_finite
from .ops.elementwise import register_elementwise
from .parametrize import ntk_parametrize

__all__ = [
    # compile and call
    "compile", "CompiledKernel", "Kernels", "register_elementwise",
    # infinite-width training dynamics (TP IIb)
    "simulate", "kernel_blocks", "KernelBlocks", "Trajectory", "Ensemble",
    "mse_continuous", "mse_discrete", "mse_infinite", "mse_ensemble",
    # finite networks: the NTK parametrization, empirical kernels, SGD against the limit
    "ntk_parametrize", "empirical_ntk", "empirical_outputs", "train_finite", "compare_widths", "WidthReport",
    # errors
    "errors", "NTKCompileError", "UnsupportedOpError", "TraceError", "WidthInferenceError",
    "GIACheckError", "InputShapeError", "NonFiniteInputError", "KernelNotPSDError",
    "DivergenceError", "NonFiniteLossError", "NonFiniteKernelError", "KernelMemoryError", "InvalidModelError",
    "IRError",
]
__version__ = "0.1.0"
