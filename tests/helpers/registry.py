"""A fixture that undoes what a test registers (nonlinearities, their rules, traced leaves)."""
import pytest

from ntkcompile import trace
from ntkcompile.ops import elementwise as ew
from ntkcompile.passes import lower


@pytest.fixture
def restore_registry():
    tables = (ew.ELEMENTWISE, ew._FUNCTIONS, lower.FUNCTION_RULES, trace.LEAF_FUNCTIONS)
    saved = [(t, dict(t)) for t in tables]
    yield
    for table, content in saved:
        table.clear()
        table.update(content)
