"""Make ``import compressai`` work beside the CPU torch build, lazily.

compressai imports torchvision (for its transform registry). The torchvision wheel that matches
torch 2.13 on PyPI is built against a torch that registers ``torchvision::nms``/``qnms`` schemas;
beside the CPU build on this machine those schemas are missing and ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist``. Defining the two schemas with
``torch.library`` before torchvision loads lets it import. lmvic never calls these operators.

``install()`` (run by ``import lmvic``) only adds an import hook: the first ``import torchvision``
(direct, or through compressai) goes through :func:`ensure_torchvision`, so processes that never
touch compressai pay nothing. When torchvision imports normally (a matching torch), nothing is
registered.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_lib = None  # keeps the torch.library alive for the process


def ensure_torchvision() -> None:
    """Import torchvision, registering the missing operator schemas only if the import needs them."""
    global _lib
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")


class _AlreadyLoaded(importlib.abc.Loader):
    """Hands the import system the module :func:`ensure_torchvision` has just loaded."""

    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module):
        pass


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        ensure_torchvision()
        return importlib.machinery.ModuleSpec(name, _AlreadyLoaded(), is_package=True)


def install() -> None:
    """Route the first torchvision import through :func:`ensure_torchvision` (idempotent)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())
