"""The public surface: ``ntkcompile.__all__`` names what users reach for, and only what exists."""
import ntkcompile


def test_all_names_exist_once_and_star_import_works():
    assert len(set(ntkcompile.__all__)) == len(ntkcompile.__all__)
    missing = [n for n in ntkcompile.__all__ if not hasattr(ntkcompile, n)]
    assert not missing
    scope = {}
    exec("from ntkcompile import *", scope)
    assert set(ntkcompile.__all__) <= set(scope)


def test_the_names_the_readme_and_the_docs_use_are_exported():
    for name in ("compile", "simulate", "kernel_blocks", "KernelBlocks", "Trajectory", "empirical_ntk",
                 "ntk_parametrize", "compare_widths", "mse_infinite", "mse_ensemble", "register_elementwise"):
        assert name in ntkcompile.__all__, name
    # the exported objects are the modules' own (no wrappers that could drift)
    from ntkcompile import dynamics, empirical, harness
    assert ntkcompile.kernel_blocks is dynamics.kernel_blocks and ntkcompile.empirical_ntk is empirical.empirical_ntk
    assert ntkcompile.compare_widths is harness.compare_widths


def test_every_public_error_is_an_ntkcompile_error():
    for name in ntkcompile.__all__:
        obj = getattr(ntkcompile, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ntkcompile.NTKCompileError), name
