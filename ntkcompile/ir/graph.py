"""The program drawn in TP IIb's graphical notation, as a Graphviz DOT description.

Nodes are the program's vectors: the fixed inputs ``x_i``, the G-vars (input
layers, matrix multiplications, convolutions, biases, poolings), the H-vars
(nonlinearities of G-vars) and the output ``f``.  Edges say how each vector is
made (TP IIb, Sec. 2, the "program as a graph" figures):

* a matrix multiplication ``W z`` is an edge ``z -> Wz`` labelled by the
  matrix's module name; a matrix used several times (weight sharing) is one
  label, and one colour, on several edges;
* a nonlinearity joins its arguments: an edge from every G-var it reads;
* a vector that is a sum (a residual stream, ``g + bias``) feeding a matrix is
  a small ``+`` node; the readout is an edge ``-> f`` labelled ``v[name]``.

The backward program is drawn beside it: a node ``dg`` for every G-var, with an
edge ``dy -> dg`` labelled ``W^T`` for each use ``y = W z`` that reads ``g``
(and ``v`` from ``df`` for the readout), times the derivative ``phi'(...)``
where it is not 1.

Repeated blocks collapse: a run of at least three isomorphic consecutive blocks
(same atom kinds and nonlinearities, same wiring relative to the block; an MLP's
hidden layers, a stack of residual blocks) is drawn once, inside a cluster that
says how many there are, with the edge into the next block drawn back into it.

``to_dot(program)`` builds the text; ``render(text, path)`` writes ``.dot`` or,
with the ``graphviz`` package or the ``dot`` program, ``.svg``/``.png``/``.pdf``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field

from .nodes import Atom, GBias, GInput, GMatMul, HAtom, SConst, Var
from .printer import Printer, atom_label, multiplier_text
from .program import READOUT

__all__ = ["to_dot", "render"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22")
_MIN_REPEATS = 3      # a run of at least this many isomorphic blocks collapses
_MAX_PERIOD = 32      # atoms per block considered


@dataclass
class _Edge:
    src: str
    dst: str
    kind: str                     # matrix, join, sum, readout, pool, adjoint
    labels: list = field(default_factory=list)
    color: str = ""


class _Drawing:
    """Nodes and edges keyed by id; ``alias`` maps a collapsed node to its representative."""

    def __init__(self):
        self.nodes: dict = {}      # id -> (label, attributes)
        self.edges: dict = {}      # (src, dst, kind) -> _Edge
        self.alias: dict = {}      # node of a repeated block -> the same node of the first block
        self.labels: dict = {}     # label overrides (the first block of a run: "g12 ... g30")
        self.backward: set = set()

    def node(self, nid, label, backward=False, **attrs):
        self.nodes.setdefault(nid, (self.labels.get(nid, label), attrs))
        if backward:
            self.backward.add(nid)

    def edge(self, src, dst, kind, label="", color="", extra=""):
        """An edge; ``label`` names the matrix (summarised over collapsed blocks), ``extra``
        follows it (a derivative, the same in every block)."""
        src, dst = self.alias.get(src, src), self.alias.get(dst, dst)
        e = self.edges.setdefault((src, dst, kind), _Edge(src, dst, kind, color=color))
        if (label or extra) and (label, extra) not in e.labels:
            e.labels.append((label, extra))


def to_dot(program, title: str = "model") -> str:
    """The DOT text of ``program`` (forward, and backward when it has one)."""
    show = Printer()
    atoms = [a for a in program.nodes if isinstance(a, Atom) and a is not program.ONE]
    d = _Drawing()
    colors = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(program.params)}
    runs = _collapse(atoms, show, d)
    _forward(program, atoms, show, colors, d)
    if program.backward is not None:
        _backward(program, show, colors, d)
    return _emit(d, title, runs)


# -- forward -----------------------------------------------------------------------

def _what(a, show) -> str:
    """A second line for an atom's node: its nonlinearity, or that it is a bias."""
    if isinstance(a, HAtom):
        return "\n" + show.expr(a.expr, ["·"] * len(a.gargs))
    if isinstance(a, GBias):
        return f"\nbias {a.param.name.removesuffix('.bias')}"
    return ""


def _refs(a, program):
    """The atoms ``a`` is computed from, in order (what its incoming edges come from)."""
    out = []
    for child in a.children():
        for var in _vars(child):
            out += [b for _, b in var.terms if b is not program.ONE and b not in out]
    return out


def _vars(node):
    if isinstance(node, Var):
        return [node]
    pieces = getattr(node, "pieces", None)
    return [v for _, v in pieces] if pieces is not None else []


def _source(vec, reader, d, show, program):
    """The node ``reader`` reads the vector from: its atom, or a ``+`` (``cat``) node of its terms."""
    pieces = getattr(vec, "pieces", None)
    vars_ = [v for _, v in pieces] if pieces is not None else [vec]
    terms = [(c, a) for v in vars_ for c, a in v.terms if a is not program.ONE]
    if len(vars_) == 1 and len(terms) == 1 and isinstance(terms[0][0], SConst) and terms[0][0].value == 1.0:
        return atom_label(terms[0][1])
    nid = d.alias.get(f"sum_{reader}", f"sum_{reader}")
    d.node(nid, "cat" if len(vars_) > 1 else "+", shape="circle", width="0.3", fixedsize="false",
           style="filled", fillcolor="white", fontsize="10")
    for c, a in terms:
        coef = "" if isinstance(c, SConst) and c.value == 1.0 else show(c)
        d.edge(atom_label(a), nid, "sum", coef)
    return nid


def _forward(program, atoms, show, colors, d):
    for i, name in enumerate(program.fixed_names):
        d.node(f"x{i}", f"x{i}\n{name}", shape="box", style="filled", fillcolor="#eeeeee")
    for a in atoms:
        nid = atom_label(a)
        kind = "G" if a.gaussian else "H"
        d.node(nid, nid + _what(a, show), shape="ellipse", style="filled",
               fillcolor="#cfe2f3" if kind == "G" else "#fce5cd")
        param = getattr(a, "param", None)
        if isinstance(a, GInput):
            d.edge(f"x{a.fixed}", nid, "matrix", param.name, colors.get(param, ""))
        elif isinstance(a, GMatMul):
            d.edge(_source(a.arg, nid, d, show, program), nid, "matrix", param.name, colors.get(param, ""))
        elif isinstance(a, HAtom):
            for b in _refs(a, program):
                d.edge(atom_label(b), nid, "join")
        elif a.consumes:              # an op-defined linear map (a pooling): an edge from what it reads
            kind_name = type(a).__name__.lstrip("G").lower()
            for child in a.children():
                if _vars(child):
                    d.edge(_source(child, nid, d, show, program), nid, "pool", kind_name)
        # else: a parameter vector (a bias) or a placeholder (a normalization's probe): nothing flows in
    r = program.readout
    d.node("f", "f", shape="doublecircle", style="filled", fillcolor="#d9ead3")
    how = {"gap": " (mean over positions)", "flatten": " (per position)"}.get(r.pool, "")
    d.edge(_source(r.vec, "f", d, show, program), "f", "readout", f"v[{r.name}]{how}")


# -- backward ----------------------------------------------------------------------

def _backward(program, show, colors, d):
    bw = program.backward
    d.node("df", "df", backward=True, shape="doublecircle", style="filled", fillcolor="#eeeeee")
    for g in sorted(bw.consumers, key=lambda a: a.uid):
        d.node("d" + atom_label(g), "d" + atom_label(g), backward=True, shape="ellipse", style="filled",
               fillcolor="#e6e6e6")
    for g, users in bw.consumers.items():
        dst = "d" + atom_label(g)
        for u in users:
            ms = [bw.multipliers[(piece, g)] for _, piece in bw.arg(program, u).pieces]
            ms = [_derivative(m, show) for m in ms if m is not None]
            times = "" if ms in ([], ["1"]) else "× " + " + ".join(ms)
            if u == READOUT:
                d.edge("df", dst, "adjoint", f"v[{program.readout.name}]", extra=times)
            else:
                param = getattr(u, "param", None)
                name = f"{param.name}^T" if param is not None else type(u).__name__.lstrip("G").lower() + "^T"
                d.edge("d" + atom_label(u), dst, "adjoint", name, colors.get(param, ""), extra=times)


def _derivative(m, show) -> str:
    """A backward multiplier as a function, ``relu'(·)`` (the same in every repeated block)."""
    if len(m.terms) == 1:
        c, a = m.terms[0]
        if isinstance(a, HAtom) and a.gargs:
            scale = "" if isinstance(c, SConst) and c.value == 1.0 else f"{show(c)} * "
            return scale + show.expr(a.expr, ["·"] * len(a.gargs))
    return multiplier_text(m, show)


# -- repeated blocks ------------------------------------------------------------------

def _signature(i, a, index, show):
    """What must agree for two atoms to be the same position of isomorphic blocks: kinds,
    nonlinearities, coefficients, and which atoms they read, relative to their own position."""
    param = getattr(a, "param", None)
    what = [type(a).__name__, getattr(param, "kind", None), str(getattr(param, "geometry", None)),
            str(getattr(a, "geom", "")), getattr(a, "fixed", None)]
    if isinstance(a, HAtom):
        what.append(show.expr(a.expr, [f"s{k}" for k in range(len(a.gargs))]))
    for child in a.children():
        for var in _vars(child):
            what.append(tuple((show(c), i - index[b]) if b in index else (show(c), None) for c, b in var.terms))
    return tuple(what)


def _collapse(atoms, show, d):
    """Find runs of >= 3 isomorphic consecutive blocks; alias each block to the first one."""
    index = {a: i for i, a in enumerate(atoms)}
    sig = [_signature(i, a, index, show) for i, a in enumerate(atoms)]
    starts = [bool(a.consumes) for a in atoms]      # a block preferably starts at a matrix
    runs = []
    _find_runs(sig, starts, 0, len(sig), runs)
    out = []
    for start, period, count in sorted(runs):
        blocks = [atoms[start + k * period: start + (k + 1) * period] for k in range(count)]
        first = blocks[0]
        for block in blocks[1:]:
            for a, rep in zip(block, first):
                for prefix in ("", "d", "sum_"):
                    d.alias[prefix + atom_label(a)] = prefix + atom_label(rep)
        for j, rep in enumerate(first):
            last = atom_label(blocks[-1][j])
            d.labels[atom_label(rep)] = f"{atom_label(rep)} ... {last}" + _what(rep, show)
            d.labels["d" + atom_label(rep)] = f"d{atom_label(rep)} ... d{last}"
        out.append((count, [atom_label(a) for a in first]))
    return out


def _find_runs(sig, starts, lo, hi, runs):
    """Greedy: the run covering most atoms in ``[lo, hi)`` (ties: a block that starts at a
    matrix multiplication, then the earliest), then the same left and right of it."""
    best, best_key = None, None
    for p in range(1, min(_MAX_PERIOD, (hi - lo) // _MIN_REPEATS) + 1):
        i = lo
        while i + p < hi:
            j = i                 # sig[t] == sig[t + p] for t in [i, j)
            while j + p < hi and sig[j] == sig[j + p]:
                j += 1
            for s in range(i, min(i + p, j + 1)):        # every alignment of blocks in the run
                count = (j - s) // p + 1
                key = (count * p, starts[s], -s)
                if count >= _MIN_REPEATS and (best_key is None or key > best_key):
                    best, best_key = (s, p, count), key
            i = j + 1
    if best is None:
        return
    start, p, count = best
    runs.append(best)
    _find_runs(sig, starts, lo, start, runs)
    _find_runs(sig, starts, start + p * count, hi, runs)


# -- DOT -----------------------------------------------------------------------------

def _q(text) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _summary(labels) -> str:
    """``(matrix, extra)`` labels of one edge: one, two, or ``first ... last (count)``."""
    mains = list(dict.fromkeys(m for m, _ in labels))
    extras = list(dict.fromkeys(x for _, x in labels if x))
    main = mains[0] if len(mains) == 1 else ", ".join(mains) if len(mains) <= 2 else \
        f"{mains[0]} ... {mains[-1]} ({len(mains)})"
    return "\n".join(t for t in (main, " + ".join(extras) if len(extras) <= 2 else extras[0] + " ...") if t)


def _emit(d, title, runs) -> str:
    backward = d.backward
    collapsed = set(d.alias)
    lines = [f"digraph {_q('Tensor Program of ' + title)} {{",
             "  rankdir=TB; newrank=true; fontname=Helvetica;",
             "  node [fontname=Helvetica, fontsize=11]; edge [fontname=Helvetica, fontsize=9];"]

    def node_line(nid, indent):
        label, attrs = d.nodes[nid]
        extra = "".join(f", {k}={_q(v)}" for k, v in attrs.items())
        return f"{indent}{_q(nid)} [label={_q(label)}{extra}];"

    in_runs = {nid for _, ids in runs for nid in ids}
    for part, title_, members in (("forward", "forward program", [n for n in d.nodes if n not in backward]),
                                  ("backward", "backward program (W^T: independent copies, GIA)",
                                   [n for n in d.nodes if n in backward])):
        if not members:
            continue
        lines.append(f"  subgraph cluster_{part} {{")
        lines.append(f"    label={_q(title_)}; style=rounded; color=\"#999999\";")
        for k, (count, ids) in enumerate(runs):
            ids = ids if part == "forward" else ["d" + i for i in ids if "d" + i in d.nodes]
            if not ids:
                continue
            lines.append(f"    subgraph cluster_{part}_repeat{k} {{")
            lines.append(f"      label={_q(f'x {count} (repeated block)')}; style=dashed; color=\"#555555\";")
            lines += [node_line(n, "      ") for n in ids if n not in collapsed]
            lines.append("    }")
        skip = in_runs if part == "forward" else {"d" + i for i in in_runs}
        lines += [node_line(n, "    ") for n in members if n not in collapsed and n not in skip]
        lines.append("  }")
    styles = {"matrix": "penwidth=1.6", "join": 'color="#b07020", arrowhead=none, style=solid',
              "sum": 'color="#888888", arrowsize=0.6', "readout": "penwidth=1.6", "pool": "style=dashed",
              "adjoint": "style=solid"}
    for e in d.edges.values():
        if e.src in collapsed or e.dst in collapsed or e.src not in d.nodes or e.dst not in d.nodes:
            continue
        attrs = [styles.get(e.kind, "")]
        if e.labels:
            attrs.append(f"label={_q(_summary(e.labels))}")
        if e.color and e.kind in ("matrix", "adjoint"):
            attrs.append(f"color={_q(e.color)}, fontcolor={_q(e.color)}")
        attrs.append(f"class={_q(e.kind)}")
        lines.append(f"  {_q(e.src)} -> {_q(e.dst)} [{', '.join(a for a in attrs if a)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- rendering ---------------------------------------------------------------------

def render(text: str, path) -> str:
    """Write ``text`` to ``path``: ``.dot``/``.gv`` as it is; ``.svg``, ``.png``, ``.pdf`` rendered
    with the ``graphviz`` Python package or the ``dot`` program when present, else the ``.dot``
    beside it, with a warning that says how to render it.  Returns the path written."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    fmt = ext.lstrip(".").lower()
    if fmt in ("dot", "gv", ""):
        with open(path if ext else path + ".dot", "w") as fh:
            fh.write(text)
        return path if ext else path + ".dot"
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"graph: cannot write {path!r}; use .dot, .gv, .svg, .png or .pdf")
    dot = shutil.which("dot")
    if dot is not None:
        subprocess.run([dot, f"-T{fmt}", "-o", path], input=text.encode(), check=True)
        return path
    try:
        import graphviz   # noqa: F401  (needs the dot program too)
        graphviz.Source(text).render(outfile=path, cleanup=True)
        return path
    except Exception:   # not installed, or installed without the dot program
        pass
    with open(root + ".dot", "w") as fh:
        fh.write(text)
    warnings.warn(f"Graphviz's dot program is not installed, so {path} was not rendered; wrote {root}.dot. "
                  f"Render it with: dot -T{fmt} {root}.dot -o {path}  (install Graphviz: apt-get install "
                  "graphviz, brew install graphviz, or conda install graphviz)", RuntimeWarning, stacklevel=2)
    return root + ".dot"
