"""Recurrent layers: ``nn.RNN``/``nn.GRU``/``nn.LSTM`` and their cells (TP II: RNNs).

A recurrent layer is one ``Scan`` atom: its states ``h_t`` for every step, a width
vector with the time steps as a fixed position axis.  The same matrices act at
every step (weight sharing), so the state covariances follow a recurrence over
pairs of steps (``kernels/recurrence.py``), planned as one loop whatever ``T``:

* Elman cells (``nn.RNN``, tanh or relu) need only 2-D expectations per pair of
  steps: exact (closed forms, or quadrature with its error estimate);
* gated cells (GRU, LSTM) make ``h_t`` a function of every earlier gate: the
  joint Monte Carlo evaluator (``kernels/scan_mc.py``).

Parametrization (README): every weight ``W = (W_std/sqrt(fan_in)) w`` with fan-in
``input_size`` for ``weight_ih`` and ``hidden_size`` for ``weight_hh``, every bias
``b_std * beta``; the gate blocks of ``weight_ih``/``weight_hh`` (PyTorch's gate
orders: GRU r, z, n; LSTM i, f, g, o) are independent matrices.  Initial states
are zero.  A layer's input is the fixed input sequence (``ScanInput``) or the
previous layer's states (``Scan``, which consumes them through ``W_ih``).

The cells ``nn.RNNCell``/``GRUCell``/``LSTMCell`` called in a Python loop are
lowered step by step into ordinary G- and H-atoms (the loop is unrolled by the
tracer; weight sharing makes every step's matrices the same).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import WidthInferenceError
from ..ir import GInput, GMatMul, Param, node
from ..ir.nodes import Atom
from ..kernels import recurrence as rec
from ..kernels.planner import ADJOINT, COVARIANCE, MEAN, NOMINAL, NTK_TERMS, SAMPLED_PAIRS, SIDES, pick, register
from ..passes.lower import Fixed, Refused, Width, rule
from ..plan import Contract, SetDiagonal, ToPairs
from .elementwise import ELEMENTWISE

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
_MODES = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "GRU": "gru", "LSTM": "lstm"}


@dataclass(frozen=True, eq=False)
class Cell(Param):
    """The parameters of one recurrent layer in one direction (what the NTK sums over):
    ``kind`` (``rnn_tanh``, ``rnn_relu``, ``gru``, ``lstm``), per-gate stds of ``W_ih``,
    ``W_hh``, ``b_ih``, ``b_hh`` (0 without biases), sizes, ``length`` (T) and
    ``reverse`` (the backward direction of a bidirectional layer)."""
    kind: str
    W_ih: tuple
    W_hh: tuple
    b_ih: tuple
    b_hh: tuple
    input_size: int
    hidden_size: int
    length: int
    reverse: bool = False

    def describe(self) -> str:
        return (f"{self.kind} cell      W_std={self.W_ih[0]:g} (ih) {self.W_hh[0]:g} (hh), "
                f"b_std={self.b_ih[0]:g}, T={self.length}{', reversed' if self.reverse else ''}")


class _ScanBase(Atom):
    __slots__ = ()
    read_off = True
    mixes_positions = True

    @property
    def joint(self) -> bool:
        """Sampled jointly over the inputs of a tile (gated cells): cross kernels are blocks
        of the kernel of both batches together."""
        return self.param.kind in ("gru", "lstm")

    @property
    def joint_rows(self) -> int:
        """Rows of one input in a joint sample (its time steps)."""
        return self.param.length

    def joint_plan(self, inputs: int, samples: int) -> None:
        """Raise ``KernelMemoryError`` if ``inputs`` sampled together do not fit (``scan_mc.plan``)."""
        from ..kernels.scan_mc import plan
        plan(cell_spec(self.param), inputs, self.param.length, samples)

    def positions(self, positions_of):
        return (self.param.length,)

    def describe(self, show):
        src = f"x{self.fixed}" if isinstance(self, ScanInput) else show(self.arg)
        how = "exact" if self.param.kind.startswith("rnn") else "joint Monte Carlo"
        return f"{self.param.kind}{' reversed' if self.param.reverse else ''} scan over T={self.param.length} " \
               f"of ({src})    # states h_t, {how}"


@node
class ScanInput(_ScanBase):
    """A recurrent layer reading the fixed input sequence ``fixed`` ``(N, T, input_size)``."""
    param: object
    fixed: int
    uid: int = -1

    def check(self, program):
        dims = program.fixed_dims[self.fixed] if 0 <= self.fixed < len(program.fixed_dims) else None
        if dims != (self.param.length, self.param.input_size):
            return [f"reads a fixed input of shape {dims}, not (T, input_size) = "
                    f"({self.param.length}, {self.param.input_size})"]
        return []


@node
class Scan(_ScanBase):
    """A recurrent layer reading the width vector ``arg`` (the previous layer's states)."""
    param: object
    arg: object
    uid: int = -1
    consumes = True

    def children(self):
        return (self.arg,)

    def backward_label(self, show):
        return f"W_ih[{self.param.name}]^T dpre"


# -- lowering: torch's modules ------------------------------------------------------

def _cell(lw, node, name, kind, input_size, hidden, T, bias, reverse):
    W_std, b_std = lw.std_for(name.split("#")[0])      # std overrides by module name
    g = GATES[kind]
    bs = (b_std,) * g if bias else (0.0,) * g
    return lw.b.param(Cell, name=name, kind=kind, W_ih=(W_std,) * g, W_hh=(W_std,) * g, b_ih=bs, b_hh=bs,
                      input_size=input_size, hidden_size=hidden, length=T, reverse=reverse)


def _sequence(lw, node, m, what, x):
    """The input as ``(kind, fixed index or Vec, T)``, checked."""
    if isinstance(x, Fixed):
        shape = tuple(lw.shape(x.node))
        if len(shape) != 3:
            raise lw.error(node, f"{what} expects a 3-D input (batched sequences), got shape {shape}")
        if not m.batch_first:
            x = Fixed(lw.fixed_transposed(x.node))       # the kernel's inputs are batch first
            shape = (shape[1], shape[0], shape[2])
        if shape[2] != m.input_size:
            raise lw.error(node, f"{what}(input_size={m.input_size}) applied to sequences of {shape[2]} "
                           "features", WidthInferenceError)
        return "fixed", lw.fixed_index(x.node, 3), shape[1]
    if isinstance(x, Width):
        want = ("n", 0, "w") if m.batch_first else (0, "n", "w")
        if len(x.positions) != 1 or x.axes != want:
            raise lw.error(node, f"{what}(batch_first={m.batch_first}) applied to a width vector of layout "
                           f"{x.axes} (expected {want}: batch, time, features)", WidthInferenceError)
        return "width", x.vec, x.positions[0]
    raise lw.error(node, f"{what} applied to a {type(x).__name__} (a PackedSequence or a per-input scalar): "
                   "pass a padded (N, T, features) tensor; variable lengths are not supported (pad, and "
                   "read the last valid step with a fixed index instead)")


class States(tuple):
    """``h_n`` of a recurrent module: the final states of each layer and direction along
    a leading fixed axis (index it: ``h_n[-1]``; ``squeeze(0)`` of a single one)."""


@dataclass(frozen=True)
class Spec:
    """What a recurrent module's call needs to know (from the module, or from the arguments
    of its ATen op in an exported program)."""
    kind: str
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    bidirectional: bool
    dropout: float = 0.0
    training: bool = False
    proj_size: int = 0

    @staticmethod
    def of(m) -> "Spec":
        return Spec(_MODES[m.mode], m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first,
                    m.bidirectional, m.dropout, m.training, getattr(m, "proj_size", 0))


@rule(nn.RNN, nn.GRU, nn.LSTM, input_layer=True)
def _recurrent_module(lw, node, m, x, hx=None):
    if hx is not None:
        raise lw.error(node, f"{type(m).__name__} with an explicit initial state (h0): the kernel is "
                       "compiled for zero initial states; call it without h0 (torch's default is zeros)")
    return recurrent(lw, node, node.target, Spec.of(m), x)


def recurrent(lw, node, name, m: Spec, x):
    """``(out, h_n)`` (an LSTM: ``(out, (h_n, c_n))``) of the recurrent module ``name``."""
    what = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "gru": "GRU", "lstm": "LSTM"}[m.kind]
    if m.proj_size:
        raise lw.error(node, f"{what} with proj_size={m.proj_size} is not supported (its projected state has "
                       "width proj_size, a fixed size, not a width taken to infinity); use proj_size=0")
    if m.dropout and m.training and m.num_layers > 1:
        raise lw.error(node, f"{what} with dropout={m.dropout} in training mode draws random masks between "
                       "layers, which the kernel of the deterministic network does not have: call model.eval() "
                       "(or use dropout=0)")
    source, inp, T = _sequence(lw, node, m, what, x)
    dirs = 2 if m.bidirectional else 1
    H = m.hidden_size
    layout = ("n", 0, "w") if m.batch_first else (0, "n", "w")
    finals, vec = [], None
    for layer in range(m.num_layers):
        states = []
        for d in range(dirs):
            size = m.input_size if layer == 0 else H * dirs
            cell = _cell(lw, node, f"{name}#l{layer}{'_reverse' if d else ''}", m.kind, size, H, T,
                         m.bias, bool(d))
            if layer == 0 and source == "fixed":
                atom = lw.b.make(ScanInput, cell, inp)
            else:
                atom = lw.b.make(Scan, cell, inp if layer == 0 else vec)
            states.append(lw.b.single(lw.b.atom_var(atom)))
            finals.append(_last(lw, node, states[-1], T, bool(d), H, layout))
        vec = states[0] if dirs == 1 else lw.b.vec([(0.5, states[0].pieces[0][1]), (0.5, states[1].pieces[0][1])])
    out = lw.width(node, vec, H * dirs, (T,), layout=layout)
    h_n = States(finals)
    if m.kind == "lstm":
        return out, (h_n, Refused("the cell states c_n of an LSTM (only the hidden states h are compiled)"))
    return out, h_n


def _last(lw, node, vec, T, reverse, H, layout):
    """The final state of a direction (step ``T - 1``, or 0 of a reversed one)."""
    from .positions import index_width
    w = Width(vec, H, (T,), layout=layout)
    return index_width(lw, node, w, tuple(0 if (r == 0 and reverse) else (-1 if r == 0 else slice(None))
                                          for r in layout))


# -- lowering: the cells, step by step ----------------------------------------------

def _gate_inputs(lw, node, m, x, h, gates):
    """``a_k = W_ih[k] x + b_ih[k]`` and ``g_k = W_hh[k] h + b_hh[k]`` as Vecs (None: zero)."""
    name, b = node.target, lw.b
    one = b.sconst(1.0)
    a, g = [], []
    for k in range(gates):
        if isinstance(x, Fixed):
            mat = lw.matrix(node, f"{name}.weight_ih[{k}]", "input", m.input_size, module=name)
            terms = [(one, b.make(GInput, mat, lw.fixed_index(x.node)))]
        elif isinstance(x, Width) and not x.positions:
            mat = lw.matrix(node, f"{name}.weight_ih[{k}]", "hidden", m.input_size, module=name)
            terms = [(one, b.make(GMatMul, mat, x.vec))]
        else:
            raise lw.error(node, f"{type(m).__name__} applied to a {type(x).__name__} with positions; a cell "
                           "takes one step (N, features)", WidthInferenceError)
        hterms = []
        if h is not None:
            mat = lw.matrix(node, f"{name}.weight_hh[{k}]", "hidden", m.hidden_size, module=name)
            hterms.append((one, b.make(GMatMul, mat, h.vec)))
        if m.bias:
            for part, lst in (("ih", terms), ("hh", hterms)):
                atom = lw.bias_atom(f"{name}.bias_{part}[{k}]", name)
                if atom is not None:
                    lst.append((one, atom))
        a.append(b.single(b.var(terms)))
        g.append(b.single(b.var(hterms)) if hterms else None)
    return a, g


def _state(lw, node, v, what):
    if v is None:
        return None
    if not isinstance(v, Width) or v.positions:
        raise lw.error(node, f"the {what} passed to a recurrent cell must be a width vector (the cell's "
                       f"previous output), got a {type(v).__name__}", WidthInferenceError)
    return v


@rule(nn.RNNCell, nn.GRUCell, nn.LSTMCell, input_layer=True)
def _cell_module(lw, node, m, x, hx=None):
    b = lw.b
    one = b.sconst(1.0)
    kind = "lstm" if isinstance(m, nn.LSTMCell) else "gru" if isinstance(m, nn.GRUCell) else \
        _MODES["RNN_" + m.nonlinearity.upper()]
    h, c = (hx if isinstance(hx, tuple) else (None, None)) if kind == "lstm" else (hx, None)
    h, c = _state(lw, node, h, "hidden state"), _state(lw, node, c, "cell state")
    a, g = _gate_inputs(lw, node, m, x, h, GATES[kind])
    # a gate's pre-activation a_k + g_k is one Var (one Gaussian slot); GRU's candidate
    # a_n + r * g_n keeps its two parts apart
    pre = [a[k] if g[k] is None else b.lincomb([(one, a[k]), (one, g[k])]) for k in range(GATES[kind])]
    sig, tanh = ELEMENTWISE["sigmoid"], ELEMENTWISE["tanh"]
    if kind.startswith("rnn"):
        fn = ELEMENTWISE["tanh" if kind == "rnn_tanh" else "relu"]
        return lw.width(node, b.apply(lambda es: b.ecall(fn, es[0]), pre), m.hidden_size)
    if kind == "gru":
        vecs = [pre[0], pre[1], a[2]] + [v for v in (g[2], h and h.vec) if v is not None]

        def gru(es):
            r, z = b.ecall(sig, es[0]), b.ecall(sig, es[1])
            cand = es[2] if g[2] is None else b.elin([(one, es[2]), (one, b.emul([r, es[3]]))])
            n = b.ecall(tanh, cand)
            terms = [(one, n), (b.sconst(-1.0), b.emul([z, n]))]
            if h is not None:
                terms.append((one, b.emul([z, es[-1]])))
            return b.elin(terms)
        return lw.width(node, b.apply(gru, vecs), m.hidden_size)
    vecs = pre + ([c.vec] if c is not None else [])

    def cell_state(es):
        i, f, gg = b.ecall(sig, es[0]), b.ecall(sig, es[1]), b.ecall(tanh, es[2])
        terms = [(one, b.emul([i, gg]))]
        if c is not None:
            terms.append((one, b.emul([f, es[4]])))
        return b.elin(terms)

    c_new = b.apply(cell_state, vecs)
    h_new = b.apply(lambda es: b.emul([b.ecall(sig, es[3]), b.ecall(tanh, cell_state(es))]), vecs)
    return lw.width(node, h_new, m.hidden_size), lw.width(node, c_new, m.hidden_size)


# -- planning (exact route: Elman cells) ---------------------------------------------

def _fn(cell):
    return ELEMENTWISE["tanh" if cell.kind == "rnn_tanh" else "relu"]


def _coef(cell):
    return cell.W_ih[0] ** 2, cell.b_ih[0] ** 2 + cell.b_hh[0] ** 2, cell.W_hh[0] ** 2


def _memo(pl):
    if not hasattr(pl, "scans"):
        pl.scans = {}
    return pl.scans


def _input_cov(pl, scan, pair):
    """``E[x_s x'_t]`` of the layer's input sequence: ``(N, T)`` same-input, else ``(*lead, T, T)``."""
    if isinstance(scan, Scan):
        return (yield from pl.cov(scan.arg, scan.arg, pair))
    left, right = SIDES[pair]
    from ..plan import Input
    fa, fb = pl.plan.make(Input, abs(left), scan.fixed), pl.plan.make(Input, abs(right), scan.fixed)
    d, T = scan.param.input_size, scan.param.length
    shapes = ((NOMINAL, T, d),) * 2
    if pair in ("d1", "d2"):
        dot = pl.plan.make(Contract, "asd,asd->as", (fa, fb), shapes)
    elif pair in ("f1", "f2"):
        dot = pl.plan.make(Contract, "asd,atd->ast", (fa, fb), shapes)
    else:
        dot = pl.plan.make(ToPairs, pl.plan.make(Contract, "asd,btd->abst", (fa, fb), shapes))
        # the diagonal against itself bit-identical to the variances: c = 1 exactly there
        dot = pl.plan.make(SetDiagonal, dot, pl.plan.make(Contract, "asd,asd->as", (fa, fa), shapes), False)
    return pl.plan.mul(1.0 / d, dot)


def forward(pl, scan, pair):
    """``(P, C)``: pre-activation and state covariances of ``scan`` on ``pair``."""
    memo = _memo(pl)
    if (scan, pair) in memo:
        return memo[(scan, pair)]
    cell = scan.param
    fn, coef, T = _fn(cell), _coef(cell), cell.length
    if pair in ("d1", "d2"):
        xin = yield from _input_cov(pl, scan, pair)
        out = yield from rec.variance_loop(pl, scan, fn, int(pair[1]), xin, coef, T)
    else:
        left, right = (1, 2) if pair == "x" else (int(pair[1]),) * 2
        dl, _ = yield from forward(pl, scan, f"d{left}")
        dr, _ = yield from forward(pl, scan, f"d{right}")
        xin = yield from _input_cov(pl, scan, pair)
        out = yield from rec.cross_loop(pl, scan, fn, pair, xin, dl, dr, coef, T)
    memo[(scan, pair)] = out
    return out


def backward(pl, scan):
    """``Delta = E[dpre_s dpre'_t]`` ``(*lead, T, T)`` (None if nothing flows back)."""
    memo = _memo(pl)
    if (scan, "delta") in memo:
        return memo[(scan, "delta")]
    out = yield from pl.D(scan, scan)
    delta = None
    if out is not None:
        p, _ = yield from forward(pl, scan, "x")
        d1, _ = yield from forward(pl, scan, "d1")
        d2, _ = yield from forward(pl, scan, "d2")
        delta = yield from rec.backward_loop(pl, scan, _fn(scan.param), p, d1, d2, out, _coef(scan.param)[2],
                                             scan.param.length)
    memo[(scan, "delta")] = delta
    return delta


# -- planning (joint Monte Carlo: gated cells) ----------------------------------------

def cell_spec(cell):
    """The ``scan_mc.CellSpec`` of a recurrent layer's cell parameter."""
    from ..kernels.scan_mc import CellSpec
    return CellSpec(cell.kind, cell.W_ih, cell.W_hh, cell.b_ih, cell.b_hh, cell.reverse)


def mc_forward(pl, scan):
    memo = _memo(pl)
    if (scan, "mc") not in memo:
        xin = yield from _input_cov(pl, scan, "x")
        memo[(scan, "mc")] = pl.call(rec.mc_forward, pl.static(cell_spec(scan.param), "cell"), pl.tensor(xin),
                                     pl.pairs, pl.mc, pl.joint_samples, pl.errors,
                                     note=(f"E[h_s h'_t] of {scan.param.name}",
                                           f"joint Monte Carlo over the tile ({pl.joint_samples} coordinates "
                                           "per replicate)"))
    return memo[(scan, "mc")]


def mc_backward(pl, scan):
    memo = _memo(pl)
    if (scan, "mc-backward") not in memo:
        out = yield from pl.D(scan, scan)
        res = None
        if out is not None:
            sim = yield from mc_forward(pl, scan)
            res = pl.call(rec.mc_backward, sim, pl.tensor(out), pl.pairs,
                          note=(f"NTK and backward of {scan.param.name}",
                                "joint Monte Carlo over the tile (the forward's samples), GIA backward "
                                "through time"))
        memo[(scan, "mc-backward")] = res
    return memo[(scan, "mc-backward")]


# -- planning rules ---------------------------------------------------------------------

@register(COVARIANCE, ScanInput)
@register(COVARIANCE, Scan)
def _scan_cov(pl, a, b, pair):
    if a is not b:
        raise NotImplementedError("two recurrent layers with the same parameters (a module applied twice)")
    if a.joint:
        sim = yield from mc_forward(pl, a)
        return pl.call(pick, sim, SAMPLED_PAIRS[pair])
    _, c = yield from forward(pl, a, pair)
    return c


@register(MEAN, ScanInput)
@register(MEAN, Scan)
def _scan_mean(pl, a, side):
    if a.joint:
        sim = yield from mc_forward(pl, a)
        return pl.call(pick, sim, "mean")
    p, _ = yield from forward(pl, a, f"d{side}")
    g = rec.bind(pl, (a, f"pre_t (means, side {side})", 0), {f"d{side}": p})
    return (yield from pl.mean(rec.of(pl, _fn(a.param), g), side))


@register(ADJOINT, Scan)
def _scan_adjoint(pl, u, w):
    """``Cov(W_ih^T dpre, W_ih^T dpre') = W_ih^2 Delta`` into the input sequence."""
    if u is not w:
        return None
    if u.joint:
        res = yield from mc_backward(pl, u)
        return None if res is None else pl.call(pick, res, "dx")
    delta = yield from backward(pl, u)
    return pl.plan.mul(u.param.W_ih[0] ** 2, delta)


@register(NTK_TERMS, Cell)
def _cell_ntk(pl, cell, atoms):
    """``sum_{s,t} Delta[s,t] P[s,t]``: every weight and bias of the layer (each contributes
    ``Delta`` times its own part of ``P``); a gated layer's from the joint Monte Carlo."""
    terms = []
    for scan in atoms:
        if scan.joint:
            res = yield from mc_backward(pl, scan)
            if res is not None:
                terms.append(pl.call(pick, res, "ntk"))
            continue
        delta = yield from backward(pl, scan)
        if delta is None:
            continue
        p, _ = yield from forward(pl, scan, "x")
        terms.append(pl.spatial_sum(pl.plan.mul(delta, p), (cell.length,)))
    return terms


# -- torch.export: the ATen ops of the modules --------------------------------------

def _aten(kind):
    def adapter(lw, node, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        pnodes = node.args[2]
        if not pnodes or any(getattr(p, "op", None) != "get_attr" for p in pnodes):
            raise lw.unsupported(node, "a recurrent op whose weights are not module parameters")
        states = hx if isinstance(hx, (list, tuple)) else [hx]
        hnodes = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        zeros = ("aten.zeros", "aten.new_zeros", "aten.zeros_like")
        if not all(isinstance(h, Fixed) for h in states) or not all(
                getattr(h, "op", None) == "call_function" and str(h.target).startswith(zeros) for h in hnodes):
            raise lw.error(node, "a recurrent op with an initial state that is not zeros: the kernel is "
                           "compiled for zero initial states; call the module without h0/c0")
        w_ih, w_hh = lw.shape(pnodes[0]), lw.shape(pnodes[1])
        spec = Spec(kind, int(w_ih[1]), int(w_hh[1]), int(num_layers), bool(has_biases), bool(batch_first),
                    bool(bidirectional), float(dropout), bool(train))
        from ..passes.lower import module_of
        return recurrent(lw, node, module_of(pnodes[0].target), spec, x)
    return adapter


def _register_aten():
    import torch
    aten = torch.ops.aten
    for name, kind in (("rnn_tanh", "rnn_tanh"), ("rnn_relu", "rnn_relu"), ("gru", "gru"), ("lstm", "lstm")):
        op = getattr(getattr(aten, name, None), "input", None)
        if op is not None:
            rule(op, input_layer=True)(_aten(kind))


_register_aten()
