"""Generic walks over IR nodes, without recursion.

Every node lists what it references in ``children()``; the walks below use
nothing else.  They keep an explicit stack, so a program (or an H-atom's
expression) of any depth is walked without touching Python's recursion limit.

* ``postorder(roots)``: every node reachable from ``roots``, children first,
  each once (shared sub-DAGs are visited once).
* ``fold(root, rule)``: ``rule(node, child_values)`` bottom-up, memoized by node
  identity.  A walker is one ``fold`` with a small per-type rule table
  (``by_type``), e.g. "does this expression use slot 3", "print it".
"""
from __future__ import annotations

from typing import Callable, Iterable


def postorder(roots: Iterable, children: Callable = None) -> list:
    """Nodes reachable from ``roots`` in post-order (children before parents)."""
    kids = children or (lambda n: n.children())
    order, seen = [], set()
    for root in roots:
        if id(root) in seen:
            continue
        stack = [(root, iter(kids(root)))]
        seen.add(id(root))
        while stack:
            node, it = stack[-1]
            for child in it:
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append((child, iter(kids(child))))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


def fold(root, rule: Callable, memo: dict = None, children: Callable = None):
    """``rule(node, [value of each child])`` evaluated bottom-up from the leaves to ``root``."""
    kids = children or (lambda n: n.children())
    memo = {} if memo is None else memo
    if id(root) in memo:
        return memo[id(root)][1]
    for node in postorder([root], kids):
        if id(node) not in memo:
            memo[id(node)] = (node, rule(node, [memo[id(c)][1] for c in kids(node)]))
    return memo[id(root)][1]


def by_type(table: dict, default=None) -> Callable:
    """A ``fold`` rule dispatching on the node's type (exact type, then its bases)."""
    def rule(node, values):
        for cls in type(node).__mro__:
            fn = table.get(cls)
            if fn is not None:
                return fn(node, values)
        if default is None:
            raise TypeError(f"no rule for {type(node).__name__}")
        return default(node, values)
    return rule
