"""Where the joint codec's gain over coding each view alone comes from: QPEM's context or the reference.

On the first views of a scene's coding order (whole, as ``lmvic eval`` crops them), at every
quality, three codings of the images, stream bytes only (no container):

- ``single``: the shipped single-view codec, what ``lmvic eval`` calls Separate (a plain hyperprior
  up to session 6, since session 7 with its own QPEM context model);
- ``noref``: the shipped joint codec with no reference for any view, i.e. its image codec's QPEM
  context with the reference path off, and the encoder's intra/inter decision; this needs no depth;
- ``ref``: the joint codec as ``lmvic encode`` runs it (each view referencing its predecessor),
  image streams; its depth streams are counted apart.

Prints per quality bpp and PSNR of each, and the BD-rates noref vs single (what the joint image
codec's QPEM context gives over the single-view codec's entropy model) and ref vs noref (what the
depth-warped reference adds to the image bits).

    python benchmarks/joint_split.py /work/runs/sceaux [--views 6]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from joint_steps import first_views
from lmvic.scene_codec import IMAGE_STREAMS, SceneInput, encode_scene, load_joint, padded_image, to_uint8
from lmvic.zoo import load_single_view
from pipelines.metrics import psnr
from pipelines.rd import bd_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dir", type=Path, help="a scene's work folder (geometry and relations stages run)")
    ap.add_argument("--views", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names, images, depths, K, T = first_views(args.work_dir, args.views, 0)
    h, w = images[0].shape[:2]
    pixels = len(images) * h * w
    joint, single = load_joint("joint-cpu").eval(), load_single_view("single_view_cpu").eval()
    curves: dict[str, list[tuple[float, float]]] = {"single": [], "noref": [], "ref": []}
    for q in range(1, joint.num_qualities + 1):
        size = {k: 0 for k in curves}
        quality = {k: [] for k in curves}
        for i, (name, image) in enumerate(zip(names, images)):
            x = padded_image(image)
            coded = single.compress(x, q)
            size["single"] += sum(len(s[0]) for s in coded["strings"])
            quality["single"].append(psnr(image, to_uint8(single.decompress(coded["strings"], coded["shape"], q)["x_hat"], h, w)))
            alone = SceneInput([name], [image], [depths[i]], K[i:i + 1], T[i:i + 1])
            _, records, out = encode_scene(joint, alone, [0], q)  # no reference, hence no depth stream
            size["noref"] += sum(s.nbytes for key, s in records[0].items() if key in IMAGE_STREAMS.values())
            quality["noref"].append(psnr(image, out.images[name]))
        _, records, out = encode_scene(joint, SceneInput(names, images, depths, K, T), range(len(names)), q)
        size["ref"] = sum(s.nbytes for r in records for name, s in r.items() if name in IMAGE_STREAMS.values())
        depth_bytes = sum(r["depth"].nbytes for r in records if "depth" in r)
        quality["ref"] = [psnr(image, out.images[n]) for n, image in zip(names, images)]
        for key in curves:
            curves[key].append((8 * size[key] / pixels, float(np.mean(quality[key]))))
        print(f"q{q}: " + "  ".join(f"{key} {curves[key][-1][0]:.4f} bpp {curves[key][-1][1]:.2f} dB" for key in curves)
              + f"  (ref's depth streams {depth_bytes} B = {8 * depth_bytes / pixels:.4f} bpp)", flush=True)

    def bd(anchor: str, test: str) -> float:
        a, t = curves[anchor], curves[test]
        return bd_rate([p[0] for p in a], [p[1] for p in a], [p[0] for p in t], [p[1] for p in t])

    print(f"{args.work_dir.name}, first {len(names)} views, image streams (BD-rate, PSNR):")
    print(f"  noref vs single (QPEM's own context):      {bd('single', 'noref'):+.1f} %")
    print(f"  ref vs noref (the depth-warped reference): {bd('noref', 'ref'):+.1f} %")
    print(f"  ref vs single:                             {bd('single', 'ref'):+.1f} %")


if __name__ == "__main__":
    main()
