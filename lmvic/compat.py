"""Make ``import compressai`` work beside the CPU torch build.

compressai imports torchvision (for its transform registry). The torchvision wheel that matches
torch 2.13 on PyPI is built against a torch that registers ``torchvision::nms``/``qnms`` schemas;
beside the CPU build on this machine those schemas are missing and ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist``. Defining the two schemas with
``torch.library`` before the first torchvision import lets it load. lmvic never calls these
operators. When torchvision imports normally (a matching torch), this module does nothing.
"""
from __future__ import annotations

import importlib
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
