"""CPU Gaussian splatting: gsplat's ``rasterization`` on a compiled C++/OpenMP rasteriser.

``rasterization`` is the entry point (gsplat's argument conventions; CUDA tensors are passed to
gsplat). The extension builds on first use (see ``geometry.splat._backend``).
"""

from geometry.splat.rendering import rasterization

__all__ = ["rasterization"]
