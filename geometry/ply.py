"""``gaussians.ply`` in the standard 3DGS layout (as written by the Inria code, read by splat viewers).

Binary little-endian vertex properties, all float32, in this order: x, y, z, nx, ny, nz (zeros),
f_dc_0..2 (SH band 0 per channel), f_rest_0..3(K-1)-1 (higher bands, channel-major: every
coefficient of red, then green, then blue), opacity (logit), scale_0..2 (log), rot_0..3 (w, x, y, z).
Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from geometry.gaussian_fit import Gaussians


def _property_names(n_coeffs: int) -> list[str]:
    rest = 3 * (n_coeffs - 1)
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
            + [f"f_rest_{i}" for i in range(rest)] + ["opacity"]
            + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def write_ply(path: str | Path, gaussians: Gaussians) -> None:
    """Write Gaussians to ``path`` atomically."""
    g = gaussians
    n, k = len(g), g.sh.shape[1]
    rest = g.sh[:, 1:].transpose(1, 2).reshape(n, -1)  # [N, 3*(K-1)] channel-major
    data = torch.cat([
        g.means, torch.zeros(n, 3), g.sh[:, 0], rest, g.logit_opacities[:, None], g.log_scales, g.quats,
    ], dim=1).detach().float().numpy().astype("<f4")
    names = _property_names(k)
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
        + [f"property float {p}" for p in names] + ["end_header"]
    ) + "\n"
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(np.ascontiguousarray(data).tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_ply(path: str | Path) -> Gaussians:
    """Read a 3DGS PLY (this layout, float properties) back into Gaussians."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    header = raw[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary little-endian PLY is supported")
    n = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    props = [line.split() for line in header if line.startswith("property")]
    if any(p[1] != "float" for p in props):
        raise ValueError(f"{path}: expected float properties only")
    names = [p[2] for p in props]
    n_rest = sum(name.startswith("f_rest_") for name in names)
    k = n_rest // 3 + 1
    degree = round(math.sqrt(k)) - 1
    if (degree + 1) ** 2 != k or names != _property_names(k):
        raise ValueError(f"{path}: not the standard 3DGS property layout")
    body = raw[end + len(b"end_header\n"):]
    if len(body) < 4 * n * len(names):
        raise ValueError(f"{path}: truncated ({len(body)} bytes for {n} vertices)")
    data = torch.from_numpy(np.frombuffer(body, dtype="<f4", count=n * len(names)).reshape(n, len(names)).copy())
    col = {name: i for i, name in enumerate(names)}
    rest = data[:, col["f_dc_2"] + 1: col["opacity"]].reshape(n, 3, k - 1).transpose(1, 2)
    return Gaussians(
        means=data[:, 0:3].clone(),
        quats=data[:, col["rot_0"]: col["rot_0"] + 4].clone(),
        log_scales=data[:, col["scale_0"]: col["scale_0"] + 3].clone(),
        logit_opacities=data[:, col["opacity"]].clone(),
        sh=torch.cat([data[:, None, col["f_dc_0"]: col["f_dc_0"] + 3], rest], dim=1).contiguous(),
        sh_degree=degree,
    )
