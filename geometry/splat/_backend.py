"""Build (on first use) and load the C++/OpenMP CPU rasteriser extension.

The extension is compiled with ``torch.utils.cpp_extension.load`` (ninja) into
``$TORCH_EXTENSIONS_DIR`` or, when that is unset, ``~/.cache/lmvic/torch_extensions``; later
imports reuse the cached build (torch rebuilds it when the source changes). Flags are ``-O3`` and
OpenMP only: no ``-march=native``, so a build runs on any x86_64 machine it is copied to.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "project.cpp", "raster.cpp")]


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "lmvic" / "torch_extensions"
    path = base / "lmvic_splat_cpu"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def extension() -> ModuleType:
    """The compiled extension module (built on the first call of the process, then cached)."""
    from torch.utils.cpp_extension import load

    return load(
        name="lmvic_splat_cpu",
        sources=[str(p) for p in _SOURCES],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(_build_dir()),
        verbose=False,
    )
