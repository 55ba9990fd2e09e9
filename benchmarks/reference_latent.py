"""How well the depth-warped reference predicts a view's latent, and how much of that the codec uses.

For each consecutive pair of the first views of a scene's coding order (the reference decoded by the
joint codec without reference, the stage-one median depth of both views, whole views as ``lmvic
eval`` crops them), at every quality:

- ``trusted``: the share of the latent (1/16) whose pixels the trust mask covers entirely, and the
  PSNR of the warped decoded reference against the view over the trusted pixels;
- ``rms y-mu``: RMS, over the trusted latent, of the view's latent minus the hyperprior's means, and
  ``rms y-L`` minus the aligned reference latent L (the backbone's analysis of the warped decoded
  reference, what the entropy model's reference prior and context receive);
- ``ref/noref``: the joint image codec's estimated bits of the view (likelihoods of y and z) with
  its reference over without it;
- ``self/noref``: the same with the view's own decoded image as its reference (same camera, no
  parallax, every pixel trusted): what the reference path saves when the reference is perfect;
- ``z of ref, self``: the share of the hyperprior's bits (z, coded without the reference) in those
  two, a floor the reference cannot lower;
- ``L hits``: over the trusted latent's non-zero symbols round(y - mu) (the ones that cost bits), the
  share the aligned reference latent gets exactly (round(L - mu) equal): what a mode copying the
  reference's symbols could leave uncoded.
- ``skip s``: over the view coded with the reference in the entropy model only (``prior`` mode, whose
  latent is the backbone's, the one L is aligned with), the share of its bits (y and z) in s×s latent
  tiles, trusted and every channel a hit as above: what a per-tile flag letting the decoder take the
  reference's symbols could save without changing the image (before the flags' own cost).

The RMS pair and ``L hits`` say how much the reference could save; ``ref/noref`` and ``self/noref``
how much the codec saves.

    python benchmarks/reference_latent.py /work/runs/fox [--views 6] [--weights joint-cpu|FILE.pt] [--depth coarse]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from geometry.warp import backward_warp, multiscale
from depth_codec import coarse, load_codec
from joint_steps import first_views
from lmvic.models.depth_codec import DepthRange
from lmvic.scene_codec import DecodedView, pad, padded_image

TRUSTED = 0.99  # a latent pixel is trusted if this share of its 16×16 pixels is
TILES = (1, 2, 4)  # skip tile sides, in latent pixels (16, 32, 64 image pixels)


def bits(out: dict, keys: tuple[str, ...] = ("y", "z")) -> float:
    """Estimated bits of a codec output (its likelihoods of ``keys``, by default y and z)."""
    return float(sum(-torch.log2(out["likelihoods"][k]).sum() for k in keys))


def skippable_bits(hit: torch.Tensor, trusted: torch.Tensor, y_bits: torch.Tensor, tile: int) -> float:
    """Bits ``y_bits`` (1, M, h, w) in ``tile``×``tile`` latent tiles whose every element is a ``hit`` and
    ``trusted`` (both (1, M, h, w) bool); partial tiles at the right and bottom edges count as tiles."""
    ok = (hit & trusted).all(dim=1, keepdim=True).float()
    h, w = ok.shape[-2:]
    pad_hw = (0, -w % tile, 0, -h % tile)
    tile_ok = -torch.nn.functional.max_pool2d(-torch.nn.functional.pad(ok, pad_hw, value=1.0), tile)
    keep = torch.nn.functional.interpolate(tile_ok, scale_factor=tile, mode="nearest")[..., :h, :w] > 0
    return float(y_bits[keep.expand_as(y_bits)].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dir", type=Path, help="a scene's work folder (geometry and relations stages run)")
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--weights", default="joint-cpu", help="a shipped joint model id, a joint weight file or a train-joint checkpoint.pt")
    ap.add_argument("--depth", choices=("coded", "coarse", "full"), default="coded",
                    help="coded: decoded by the depth codec as ``lmvic encode`` codes it (each view's depth predicted "
                         "from the previous one's); coarse: at the resolution the depth codec codes it, uncoded; "
                         "full: the stage-one depth")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = load_codec(args.weights)
    image, backbone = codec.image, codec.image.backbone
    names, images, depths, K, T = first_views(args.work_dir, args.views, 0)
    x = [padded_image(im) for im in images]
    d = [pad(torch.as_tensor(dm, dtype=torch.float32)[None]) for dm in depths]
    K, T = torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(T, dtype=torch.float32)
    scale = DepthRange.of(torch.cat([v.flatten() for v in d]))
    if args.depth == "coarse":
        d = [coarse(codec, v, scale) for v in d]
    elif args.depth == "coded":
        d = codec.encode_depth_chain(d, K, T, scale)[1]
    print(f"{args.work_dir.name}: {len(names) - 1} pairs, {args.depth} depth, weights {args.weights}")
    with torch.no_grad():
        pairs = range(1, len(x))  # (reference t - 1, target t)
        relations = [codec.relation(DecodedView(None, None, d[t - 1], K[t - 1:t], T[t - 1:t]), d[t], K[t:t + 1],
                                    T[t:t + 1]) for t in pairs]
        rels = [multiscale(relation.disparity, relation.mask) for relation in relations]
        pixels = [rel[1][1] > TRUSTED for rel in rels]
        masks = [(rel[16][1] > TRUSTED).expand(-1, backbone.M, -1, -1) for rel in rels]
        trusted = [float(mask.float().mean()) for mask in masks]
        medians = backbone.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
        for q in range(1, codec.num_qualities + 1):
            level = backbone.levels(q, 1)
            alone = [image(v, q, None) for v in x]  # each view without reference: the next view's reference

            def decoded(i: int) -> DecodedView:
                return DecodedView(alone[i]["x_hat"].clamp(0, 1), alone[i]["features"], d[i], K[i:i + 1], T[i:i + 1])

            psnr, err_mu, err_ref, count, with_ref, with_self, without = [], 0.0, 0.0, 0, 0.0, 0.0, 0.0
            z_ref = z_self = 0.0
            active = hits = 0
            prior_bits, skip = 0.0, dict.fromkeys(TILES, 0.0)
            for t, rel, good, mask in zip(pairs, rels, pixels, masks):
                r = t - 1
                ref = decoded(r)
                warped = backward_warp(ref.image, rel[1][0])
                psnr.append(float(-10 * torch.log10(((warped - x[t]) ** 2).mean(1, keepdim=True)[good].mean())))
                y = backbone.gain(image.analyse(x[t], None), level)
                aligned = backbone.gain(image.analyse(warped, None), level)
                z = backbone.hyper_analysis(y)
                _, means = backbone.gaussian_params(torch.round(z - medians) + medians)
                err_mu += float(((y - means) ** 2)[mask].sum())
                err_ref += float(((y - aligned) ** 2)[mask].sum())
                count += int(mask.sum())
                coded = torch.round(y - means)
                symbols = coded[mask]
                live = symbols != 0
                active += int(live.sum())
                hit = torch.round(aligned - means) == coded
                hits += int(hit[mask][live].sum())
                side = codec.image_side(ref, d[t], K[t:t + 1], T[t:t + 1])
                out_ref = image(x[t], q, side)
                out_prior = image(x[t], q, side.entropy_only())
                prior_bits += bits(out_prior)
                y_bits = -torch.log2(out_prior["likelihoods"]["y"])
                for tile in TILES:
                    skip[tile] += skippable_bits(hit, mask, y_bits, tile)
                out_self = image(x[t], q, codec.image_side(decoded(t), d[t], K[t:t + 1], T[t:t + 1]))
                with_ref, z_ref = with_ref + bits(out_ref), z_ref + bits(out_ref, ("z",))
                with_self, z_self = with_self + bits(out_self), z_self + bits(out_self, ("z",))
                without += bits(alone[t])
            print(f"q{q}: trusted {np.mean(trusted):.2f} (warp PSNR {np.mean(psnr):.2f} dB)  "
                  f"rms y-mu {np.sqrt(err_mu / count):.3f}  rms y-L {np.sqrt(err_ref / count):.3f}  "
                  f"ref/noref {with_ref / without:.3f}  self/noref {with_self / without:.3f}  "
                  f"z of ref, self {z_ref / with_ref:.2f}, {z_self / with_self:.2f}  "
                  f"L hits {hits / max(active, 1):.2f}  "
                  + "  ".join(f"skip {s} {v / prior_bits:.3f}" for s, v in skip.items()), flush=True)


if __name__ == "__main__":
    main()
