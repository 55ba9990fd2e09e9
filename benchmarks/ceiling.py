"""What limits the single-view codec's quality: its transforms (the autoencoder ceiling) or the quantiser.

For each image set and quality level it prints the single-view codec's estimated bpp and PSNR (the
forward pass: latent rounded, likelihoods of y and z) and the **ceiling**: the PSNR of the synthesis
of the latent *not* rounded. No quantiser step can make a level better than its ceiling, so a level
close to its ceiling is limited by what the transforms can represent, not by its rate.

Image sets: Kodak (every k-th image, whole), centre crops of the held-out scenes (fox, sceaux_castle:
the training run's validation crops) and of the training scenes (beer, plush_dog, temple_ring).
A large gap between the sets' ceilings says the transforms fit the training content, not content
in general.

``--per-image`` prints instead, for every Kodak image, the ceiling at the top quality beside the image's
texture (``gradient_energy``: mean absolute difference of neighbouring pixels), and their correlation.

    python benchmarks/ceiling.py [WEIGHTS ...] [--every 6] [--qualities 1,4,6] [--per-image]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lmvic.entropy_models import bits_per_pixel
from lmvic.training.data import HELD_OUT_SCENES, gradient_energy, scene_images, validation_crops
from lmvic.zoo import single_view_from
from pipelines.commands.eval_image import landscape_batch

TRAINING_SCENES = ("beer", "plush_dog", "temple_ring")


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) of (B, 3, H, W) images in [0, 1], x̂ clamped."""
    mse = (x_hat.clamp(0, 1) - x).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def image_sets(kodak: Path, scenes: Path, every: int) -> dict[str, torch.Tensor]:
    """Name → (n, 3, H, W) images in [0, 1]: Kodak, held-out and training-scene crops (256 px)."""
    def crops(names: tuple[str, ...], per_scene: int) -> torch.Tensor:
        paths = []
        for name in names:
            found = scene_images(scenes, include=(name,), exclude=())
            paths += found[:: max(1, len(found) // per_scene)][:per_scene]
        return validation_crops(paths)

    return {"kodak": landscape_batch(sorted(kodak.glob("*.png"))[::every]),
            "held-out": crops(HELD_OUT_SCENES, 4), "training": crops(TRAINING_SCENES, 4)}


@torch.no_grad()
def levels_and_ceiling(model, x: torch.Tensor, quality: int, batch: int = 4) -> tuple[float, float, float]:
    """(mean estimated bpp, mean PSNR, mean ceiling PSNR) of images x (n, 3, H, W) at ``quality``."""
    bpp, coded, ceiling = [], [], []
    for part in x.split(batch):
        out = model(part, quality)
        bpp.append(bits_per_pixel(out["likelihoods"], part.shape[-2] * part.shape[-1]))
        coded.append(psnr(out["x_hat"], part))
        y = model.latent(part, quality)
        ceiling.append(psnr(model.synthesise(model.inverse_gain(y, model.levels(quality, len(part))))[-1], part))
    return tuple(float(torch.cat(v).mean()) for v in (bpp, coded, ceiling))


def per_image(model, kodak: Path) -> None:
    """Each Kodak image's ceiling at the top quality and texture, sorted by ceiling; their correlation."""
    paths = sorted(kodak.glob("*.png"))
    x, q = landscape_batch(paths), model.num_qualities
    rows = []
    for i, img in enumerate(x):
        _, _, ceiling = levels_and_ceiling(model, img[None], q)
        rows.append((paths[i].stem, ceiling, gradient_energy((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))))
    for name, ceiling, texture in sorted(rows, key=lambda r: r[1]):
        print(f"{name} | ceiling q{q} {ceiling:.2f} dB | texture {texture:.1f}")
    print(f"correlation of ceiling and texture: {np.corrcoef([r[1] for r in rows], [r[2] for r in rows])[0, 1]:+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="*", default=["single_view_cpu"],
                    help="shipped names, exported .pt or training checkpoints/snapshots")
    ap.add_argument("--kodak", type=Path, default=Path("/work/shared/kodak"))
    ap.add_argument("--scenes", type=Path, default=Path("/work/shared/scenes"))
    ap.add_argument("--every", type=int, default=6, help="probe every k-th Kodak image")
    ap.add_argument("--qualities", default="1,4,6")
    ap.add_argument("--per-image", action="store_true", help="each Kodak image's ceiling and texture")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.per_image:
        for source in args.weights:
            print(source)
            per_image(single_view_from(source).eval(), args.kodak)
        return
    sets = image_sets(args.kodak, args.scenes, args.every)
    qualities = [int(q) for q in args.qualities.split(",")]
    print("weights | set | q | est. bpp | PSNR dB | ceiling dB (latent not rounded)")
    for source in args.weights:
        model = single_view_from(source).eval()
        for name, x in sets.items():
            for q in qualities:
                bpp, coded, ceiling = levels_and_ceiling(model, x, q)
                print(f"{'/'.join(Path(source).parts[-3:])} | {name} ({len(x)}) | {q} | {bpp:.4f} | {coded:.2f} | {ceiling:.2f}", flush=True)


if __name__ == "__main__":
    main()
