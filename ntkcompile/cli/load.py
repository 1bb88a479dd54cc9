"""What the command line reads: models (MODEL) and arrays (inputs, targets).

MODEL is one of

* a ``torch.export`` archive (``torch.export.save``, usually ``.pt2``);
* a TorchScript archive (``torch.jit.save``): converted to an exported program
  with torch's TorchScript converter when this torch has one, on an example input;
* ``package.module:factory``: imported and called (``--model-args`` as JSON: a list
  of positional arguments or an object of keyword arguments), optionally with a
  state dict (``--state-dict w.pt``, read with ``weights_only=True``);
* a pickled whole module (``torch.save(model)``): refused, because unpickling runs
  whatever code the file names; ``--trust-pickle`` loads it.

Files are recognised by their contents, not their names.  Anything unusable raises
``BadInput`` with a one-line message (the command line exits with status 2).
"""
from __future__ import annotations

import importlib
import json
import os
import pickletools
import re
import sys
import zipfile

import numpy as np
import torch
from torch import nn

__all__ = ["BadInput", "load_array", "load_model"]


class BadInput(ValueError):
    """The user's input cannot be used (exit status 2); the message is one line."""


_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_model(spec: str, *, model_args=None, state_dict=None, trust_pickle=False, example=None):
    """An ``nn.Module`` or ``ExportedProgram`` for ``spec``; ``example`` (a small input batch)
    is needed only to convert TorchScript."""
    if not os.path.exists(spec) and _REFERENCE.match(spec):
        model = _from_reference(spec, model_args)
    else:
        if model_args is not None:
            raise BadInput("--model-args applies to a package.module:factory model, not to a file")
        model = _from_file(spec, trust_pickle, example)
    if state_dict is not None:
        if not isinstance(model, nn.Module):
            raise BadInput("--state-dict applies to a package.module:factory model or a pickled module")
        _load_state_dict(model, state_dict)
    return model


def _from_reference(spec, model_args):
    module_name, _, attr = spec.partition(":")
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)                 # like `python -m`: modules of the current folder
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"cannot import {module_name!r} for model {spec!r}: {e}") from e
    finally:
        if added:
            sys.path.remove(here)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"{module_name} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    args = _json(model_args, "--model-args") if model_args is not None else []
    if isinstance(obj, nn.Module):
        if model_args is not None:
            raise BadInput(f"{spec} is a module instance; --model-args needs a factory")
        return obj
    if not callable(obj):
        raise BadInput(f"{spec} is neither a module nor a factory (a callable returning one)")
    try:
        model = obj(**args) if isinstance(args, dict) else obj(*args) if isinstance(args, list) else obj(args)
    except TypeError as e:
        raise BadInput(f"{spec}{'(...)' if args else '()'} failed: {e} (pass its arguments with --model-args)") from e
    if not isinstance(model, nn.Module):
        raise BadInput(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _json(text, flag):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{flag} is not valid JSON ({e}): {text!r}") from e


def _load_state_dict(model, path):
    _exists(path, "--state-dict")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"--state-dict {path}: not a state dict of tensors ({_first_line(e)})") from e
    if not isinstance(sd, dict):
        raise BadInput(f"--state-dict {path} holds a {type(sd).__name__}, not a state dict")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise BadInput(f"--state-dict {path} does not fit the model: {_first_line(e)}") from e


def _from_file(path, trust_pickle, example):
    _exists(path, "model")
    kind, names = _archive_kind(path)
    if kind == "export":
        try:
            return torch.export.load(path)
        except Exception as e:
            raise BadInput(f"{path} looks like a torch.export archive but does not load: {_first_line(e)}") from e
    if kind == "torchscript":
        return _from_torchscript(path, example)
    if kind == "pickle" and any(not _harmless(n) for n in names):
        objects = ", ".join(sorted({n for n in names if not _harmless(n)})[:3])
        if not trust_pickle:
            raise BadInput(
                f"{path} is a pickled Python object ({objects}), e.g. torch.save(model): loading it runs "
                "whatever code the file names (arbitrary code execution). Load it only if you trust its "
                "source, with --trust-pickle; or save the model with torch.export.save, or pass "
                "package.module:factory with --state-dict")
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise BadInput(f"{path}: the pickled object does not load: {_first_line(e)}") from e
        if not isinstance(model, nn.Module):
            raise BadInput(f"{path} holds a pickled {type(model).__name__}, not an nn.Module")
        return model
    if kind == "pickle":
        raise BadInput(f"{path} holds tensors (a state dict?), not a model: pass the model as "
                       "package.module:factory with --state-dict FILE")
    raise BadInput(f"{path} is not a model: expected a torch.export archive (.pt2), a TorchScript archive, "
                   "or a pickled module (--trust-pickle)")


def _exists(path, what):
    if not os.path.exists(path):
        raise BadInput(f"{what}: no such file: {path}")
    if os.path.isdir(path):
        raise BadInput(f"{what}: {path} is a directory, not a file")


def _archive_kind(path):
    """``("export" | "torchscript" | "pickle" | None, globals the pickle names)``, from the zip's entries."""
    if not zipfile.is_zipfile(path):
        return None, []
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        tails = {n.split("/", 1)[-1] for n in names}
        if "archive_format" in tails or any(t.startswith("models/") for t in tails):
            return "export", []
        if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
            return "torchscript", []
        data = next((n for n in names if n.split("/", 1)[-1] == "data.pkl"), None)
        if data is None:
            return None, []
        try:
            return "pickle", _pickle_globals(zf.read(data))
        except Exception:     # not a readable pickle
            return None, []


def _pickle_globals(data: bytes) -> list:
    """The ``module.name`` globals a pickle refers to, read without executing it."""
    strings, names = [], []
    for op, arg, _ in pickletools.genops(data):
        if isinstance(arg, str) and "UNICODE" in op.name:
            strings.append(arg)
        elif op.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
    return names


def _harmless(name):
    """Globals of plain tensor containers (what ``weights_only=True`` accepts)."""
    return (name.startswith(("torch._utils._rebuild", "collections.OrderedDict", "builtins.", "__builtin__."))
            or re.fullmatch(r"torch\.\w*Storage", name) is not None or name in ("torch.Size", "torch.device"))


def _from_torchscript(path, example):
    try:
        scripted = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise BadInput(f"{path}: the TorchScript archive does not load: {_first_line(e)}") from e
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError as e:
        raise BadInput(f"{path} is TorchScript, which this torch ({torch.__version__}) cannot convert to a "
                       "graph ntkcompile lowers; save the model with torch.export.save instead") from e
    if example is None:
        raise BadInput(f"{path} is TorchScript: converting it needs the input shape (--input-shape)")
    try:
        return TS2EPConverter(scripted, (example.to(torch.float32),)).convert()
    except Exception as e:
        raise BadInput(f"{path}: could not convert the TorchScript graph ({type(e).__name__}: {_first_line(e)}); "
                       "save the model with torch.export.save instead") from e


def load_array(spec: str, key=None, what="input") -> torch.Tensor:
    """A tensor from ``.npy``, ``.npz`` (``key``, or ``FILE.npz:KEY``) or ``.pt`` (``weights_only``)."""
    path = spec
    if not os.path.exists(spec) and ":" in spec and os.path.exists(spec.rsplit(":", 1)[0]):
        path, key = spec.rsplit(":", 1)
    _exists(path, what)
    try:
        if _is_npz(path):
            with np.load(path, allow_pickle=False) as z:
                arr = _pick(dict(z), key, path, what)
        elif _is_npy(path):
            arr = np.load(path, allow_pickle=False)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            arr = _pick(obj, key, path, what) if isinstance(obj, dict) else obj
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{what} {path}: not a .npy, .npz or .pt array ({_first_line(e)})") from e
    if isinstance(arr, np.ndarray):
        if arr.dtype.kind not in "biuf":
            raise BadInput(f"{what} {path}: holds {arr.dtype} values, not numbers")
        arr = torch.from_numpy(np.ascontiguousarray(arr))
    if not isinstance(arr, torch.Tensor):
        raise BadInput(f"{what} {path} holds a {type(arr).__name__}, not an array")
    return arr


def _pick(arrays: dict, key, path, what):
    if key is not None:
        if key not in arrays:
            raise BadInput(f"{what} {path} has no array {key!r}; it has {sorted(arrays)}")
        return arrays[key]
    if len(arrays) != 1:
        raise BadInput(f"{what} {path} holds arrays {sorted(arrays)}: pick one with --key or {path}:NAME")
    return next(iter(arrays.values()))


def _is_npy(path):
    with open(path, "rb") as fh:
        return fh.read(6) == b"\x93NUMPY"


def _is_npz(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return all(n.endswith(".npy") for n in zf.namelist())


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
