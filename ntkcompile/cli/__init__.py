"""The ``ntkcompile`` command line (also ``python -m ntkcompile``).

    ntkcompile kernel MODEL --x1 X1.npy [--x2 X2.npy] --out K.npz      NNGP and NTK to an .npz
    ntkcompile show MODEL [--input-shape 3,32,32] [--code] [--graph G.svg]
    ntkcompile simulate MODEL --x-train X.npy --y-train Y.npy --loss mse --lr 1 --steps 100 --out T.npz
    ntkcompile demo [--full]            the digits demo (ntkcompile.demo)
    ntkcompile bench [...]              benchmarks/mlp_timing.py

MODEL: a ``torch.export.save`` archive, a TorchScript archive, or
``package.module:factory`` (``--model-args``, ``--state-dict``); a pickled whole
module only with ``--trust-pickle`` (see ``cli/load.py``).

Exit status: 0 ok, 1 failure (e.g. an op without a rule), 2 usage or bad input
(a missing file, a file that is not a model, inputs that do not fit it, an unknown
``--get``), each with a one-line message on stderr; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

from ..errors import InputShapeError, NonFiniteInputError, NTKCompileError
from .load import BadInput

__all__ = ["main"]

_BAD_INPUT = (BadInput, InputShapeError, NonFiniteInputError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = _parser()
    if argv[:1] in (["demo"], ["bench"]):      # every further argument is the script's own
        args = argparse.Namespace(command=argv[0], args=argv[1:], debug=False,
                                  run=parser._commands[argv[0]])
    else:
        args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    name = f"ntkcompile {args.command}"
    with warnings.catch_warnings():
        if not args.debug:
            warnings.simplefilter("ignore", FutureWarning)       # torch's own deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.showwarning = lambda msg, *a, **k: print(f"{name}: warning: {_one_line(msg)}", file=sys.stderr)
        try:
            return int(args.run(args) or 0)
        except _BAD_INPUT as e:
            if args.debug:
                raise
            print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except NTKCompileError as e:            # the model is fine as input, but not supported
            if args.debug:
                raise
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:                 # `ntkcompile show ... | head`: the reader is gone
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if args.debug:
                raise
            print(f"{name}: failed: {type(e).__name__}: {_one_line(e)} (--debug shows the traceback)",
                  file=sys.stderr)
            return 1


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _parser() -> argparse.ArgumentParser:
    from . import commands

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument("model", metavar="MODEL",
                   help="a torch.export archive (.pt2), a TorchScript archive, or package.module:factory")
    g.add_argument("--model-args", metavar="JSON", help="arguments of the factory: a JSON list or object")
    g.add_argument("--state-dict", metavar="FILE", help="parameters for the model (torch.save of a state dict)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="load a pickled whole module (torch.save(model)); unpickling runs arbitrary code "
                        "from the file, so only for files you trust")
    g.add_argument("--W-std", type=float, default=1.0, metavar="S", help="weight scale of every layer (default 1.0)")
    g.add_argument("--b-std", type=float, default=0.0, metavar="S", help="bias scale of every layer (default 0.0)")
    g.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--jit", action="store_true", help="run the kernel through torch.compile")
    g.add_argument("--quadrature-degree", type=int, default=96, metavar="N",
                   help="nodes per dimension of the quadrature rule (default 96)")
    g.add_argument("--key", help="array to read from .npz/.pt inputs holding several (or FILE.npz:NAME)")

    parser = argparse.ArgumentParser(prog="ntkcompile", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run 'ntkcompile COMMAND --help' for a command's options.")
    import ntkcompile
    parser.add_argument("--version", action="version", version=f"ntkcompile {ntkcompile.__version__}")
    parser.set_defaults(debug=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("kernel", parents=[common, model], help="NNGP and NTK of inputs, written to an .npz",
                       description="Compute the infinite-width NNGP and NTK of MODEL on X1 (against X2, or "
                                   "itself) and write them to an .npz (arrays nngp, ntk; mc_stderr and "
                                   "quad_error when the kernel needed Monte Carlo or quadrature).")
    p.add_argument("--x1", required=True, metavar="FILE", help="inputs (N1, ...): .npy, .npz or .pt")
    p.add_argument("--x2", metavar="FILE", help="inputs (N2, ...); default: X1 against itself")
    p.add_argument("--get", default="nngp,ntk", help="kernels to compute: nngp, ntk or nngp,ntk (default)")
    p.add_argument("--tile-size", type=int, metavar="B", help="inputs per tile side (memory: one tile's work)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on long runs)")
    p.add_argument("--out", required=True, metavar="K.npz", help="output file")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.set_defaults(run=commands.kernel)

    p = sub.add_parser("show", parents=[common, model], help="print the Tensor Program, draw its graph",
                       description="Print MODEL's Tensor Program (forward, backward, the evaluator of every "
                                   "expectation) and optionally the generated code and the graph in TP IIb's "
                                   "notation (.dot, or .svg/.png/.pdf with Graphviz).")
    p.add_argument("--input-shape", metavar="C,H,W", help="shape of one input, e.g. 3,32,32 (needed when the "
                                                          "model does not start with a Linear)")
    p.add_argument("--code", action="store_true", help="also print the generated kernel code")
    p.add_argument("--graph", metavar="G.svg", help="write the program's graph (.dot, .svg, .png, .pdf)")
    p.set_defaults(run=commands.show)

    p = sub.add_parser("simulate", parents=[common, model], help="infinite-width SGD trajectory",
                       description="Train MODEL at infinite width (ntkcompile.simulate: the SGD recursion with "
                                   "the frozen NTK) and write the outputs and losses at every step to an .npz.")
    p.add_argument("--x-train", required=True, metavar="FILE")
    p.add_argument("--y-train", required=True, metavar="FILE",
                   help="targets: floats (N, out) for mse, class indices (N,) for cross_entropy")
    p.add_argument("--x-test", metavar="FILE")
    p.add_argument("--loss", choices=("mse", "cross_entropy"), default="mse")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, help="minibatch size (default: full batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (and of --f0 prior)")
    p.add_argument("--f0", choices=("zero", "prior"), default="zero", help="initial outputs (default zero)")
    p.add_argument("--out", required=True, metavar="T.npz", help="output: train, test, loss per step")
    p.add_argument("--plot", metavar="T.png", help="also plot the loss and a few outputs (matplotlib)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.set_defaults(run=commands.simulate)

    # demo and bench pass every argument on to their script (main() dispatches them before parsing)
    sub.add_parser("demo", help="the digits demo, python -m ntkcompile.demo (--help for its options)")
    sub.add_parser("bench", help="benchmarks/mlp_timing.py (--help for its options)")
    parser._commands = {"demo": commands.demo, "bench": commands.bench}
    return parser
