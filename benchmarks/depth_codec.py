"""Fidelity of the joint mode's depth codec on held-out scenes, as ``lmvic encode`` codes the depth.

The first views of a scene's coding order (whole views as ``lmvic eval`` crops them), their stage-one
median depth normalised with the views' common ``DepthRange``, coded in a chain (each view predicted
by CVDP from the previous view's *decoded* depth, the first without reference). Over the pixels with
a valid stage-one depth it prints, per view and in total: the stream's bytes, the median and 90th
percentile of the relative depth error |D̂ − D| / D, and the share within the codec's trust tolerance
(``TRUST_TOLERANCE``: what the trust mask can accept). The same figures for the map uncoded at the
codec's resolution (``coarse``) are the floor the resolution sets. ``constant``: the mean absolute
error, in normalised units, of a first view whose map is one value (a codec that cannot code a
constant has collapsed to a fixed output). ``by depth``: the coded errors over the views' pixels split
into depth quintiles (with the last fifth split again at the 90th and 95th percentiles), with the
mean normalised value u of the band and the median |û − u|: where in the scene the errors are.

    python benchmarks/depth_codec.py /work/runs/fox /work/runs/sceaux [--views 6] [--weights joint-cpu|FILE.pt|RUN/checkpoint.pt]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from joint_steps import first_views
from lmvic.joint_training import checkpoint_codec
from lmvic.models.depth_codec import DepthRange
from lmvic.scene_codec import DEPTH_QUALITY, TRUST_TOLERANCE, JointCodec, load_joint, load_joint_file, pad

CONSTANTS = (0.2, 0.5, 0.8)


def load_codec(weights: str) -> JointCodec:
    """A shipped model id, an exported joint weight file, or a training run's checkpoint."""
    path = Path(weights)
    if path.name.startswith("checkpoint"):
        return checkpoint_codec(path)
    return (load_joint_file(path) if path.suffix == ".pt" else load_joint(weights)).eval()


def coarse(codec: JointCodec, depth: torch.Tensor, scale: DepthRange) -> torch.Tensor:
    """A padded depth (1, H, W) at the depth codec's resolution, uncoded, back at (1, H, W)."""
    return scale.denormalise(codec.fine_depth(codec.coarse_depth(scale.normalise(depth)), tuple(depth.shape[-2:])))


def valid_pixels(decoded: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both depths (same shape, metric) at the valid pixels of ``truth``, flattened."""
    valid = torch.isfinite(truth) & (truth > 0)
    return decoded[valid], truth[valid]


def errors(decoded: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Relative depth errors over the valid pixels of ``truth`` (both (1, H, W) metric)."""
    h, t = valid_pixels(decoded, truth)
    return ((h - t).abs() / t).numpy()


#: Quantiles of the true depth bounding the bands of ``by_depth``.
BANDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0)


def by_depth(decoded: list[torch.Tensor], truth: list[torch.Tensor], scale: DepthRange) -> list[str]:
    """One line per depth band (``BANDS``) of the valid pixels of ``truth`` (views (1, H, W) metric)."""
    h, t = valid_pixels(torch.cat([v.flatten() for v in decoded]), torch.cat([v.flatten() for v in truth]))
    rel = errors(h, t)
    u, u_hat = (scale.normalise(v[None, None])[0, 0, 0].numpy() for v in (t, h))
    t = t.numpy()
    edges = np.quantile(t, BANDS)
    lines = []
    for low, high in zip(edges[:-1], edges[1:]):
        band = (t >= low) & (t <= high)
        lines.append(f"    depth {low:7.2f}-{high:7.2f}: share {band.mean():.2f}  u {u[band].mean():.3f}  "
                     f"|du| median {np.median(np.abs(u_hat - u)[band]):.4f}  {summary(rel[band])}")
    return lines


def summary(err: np.ndarray) -> str:
    return (f"median {100 * np.median(err):5.1f} %  p90 {100 * np.quantile(err, 0.9):6.1f} %  "
            f"within tau {np.mean(err <= TRUST_TOLERANCE):.2f}")


def scene_fidelity(codec: JointCodec, work: Path, views: int) -> None:
    _, _, depths, K, T = first_views(work, views, 0)
    d = [pad(torch.as_tensor(dm, dtype=torch.float32)[None]) for dm in depths]
    K, T = torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(T, dtype=torch.float32)
    scale = DepthRange.of(torch.cat([v.flatten() for v in d]))
    print(f"{work.name}: {len(d)} views, near {scale.near:.3g}, far {scale.far:.3g}")
    streams, coded = codec.encode_depth_chain(d, K, T, scale)
    nbytes = [stream.nbytes for stream in streams]
    coded_err = [errors(depth_hat, v) for depth_hat, v in zip(coded, d)]
    coarse_err = [errors(coarse(codec, v, scale), v) for v in d]
    for i, n in enumerate(nbytes):
        print(f"  view {i}: {n:5d} B  coded {summary(coded_err[i])}   coarse {summary(coarse_err[i])}")
    print(f"  all    : {sum(nbytes):5d} B  coded {summary(np.concatenate(coded_err))}   "
          f"coarse {summary(np.concatenate(coarse_err))}")
    print("  by depth (coded):", *by_depth(coded, d, scale), sep="\n")


def constant_errors(codec: JointCodec) -> str:
    """Mean absolute error of a constant normalised 64×64 map coded as a first view."""
    out = []
    with torch.no_grad():
        for c in CONSTANTS:
            x = torch.full((1, 1, 64, 64), c)
            x_hat = codec.depth(x, DEPTH_QUALITY, None)["x_hat"]
            out.append(f"{c}: {float((x_hat - x).abs().mean()):.3f}")
    return "  ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dirs", type=Path, nargs="+", help="scene work folders (geometry and relations run)")
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--weights", default="joint-cpu",
                    help="a shipped joint model id, a joint weight file or a train-joint checkpoint.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = load_codec(args.weights)
    print(f"weights {args.weights}; constant maps (mean abs error): {constant_errors(codec)}")
    for work in args.work_dirs:
        scene_fidelity(codec, work, args.views)


if __name__ == "__main__":
    main()
