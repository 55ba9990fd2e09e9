"""Joint mode: BD-rate against Separate as a function of training, from a run's snapshots.

Each snapshot (a copy of a ``lmvic train-joint`` run's ``checkpoint.pt``, taken while it trains) is
made into the codec ``--export`` would ship, and codes the first views (whole, or the same centre crops) of a
scene's coding order at every quality, as ``lmvic eval`` does (real container bytes, decoded by
the decoder). The single-view codec on the same views is the anchor. Prints per snapshot the
BD-rate (PSNR and MS-SSIM) and per quality the bytes against the anchor and the PSNR difference;
writes them as CSV (adding to the rows an earlier run wrote for the same scene, views and crop)
and plots BD-rate against the clips seen.

    python benchmarks/joint_steps.py /work/runs/sceaux --snapshot 294:s4/checkpoint.pt \\
        --snapshot 2136:s5/checkpoint.pt --out benchmarks/results/joint_steps_sceaux.csv

``CLIPS:PATH``: the training clips (batch x ranks x steps, over every run on this base) the
snapshot has seen, the plot's x axis.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lmvic.eval_codec import JointEvalCodec
from lmvic.joint_training import checkpoint_codec
from lmvic.separate_codec import SeparateCodec
from pipelines.geometry_stage import load_cameras, load_depth
from pipelines.rd import METRICS, crop_common, curve_bd_rates, format_bd_rates, measure
from pipelines.relations import finished_relations


def first_views(work: Path, views: int, size: int):
    """The first ``views`` of the coding order, centre-cropped to ``size``² (0: whole, cropped at the
    top-left to a multiple of 64 as ``lmvic eval`` does): names, images, depths, K (principal point
    moved by the crop offset) and T."""
    cams = load_cameras(work / "sfm")
    names = finished_relations(work).info["order"][:views]
    index = [cams.names.index(n) for n in names]
    images = cams.load_images()
    if size:
        h, w = images[index[0]].shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        cut = (slice(top, top + size), slice(left, left + size))
        chosen = [np.ascontiguousarray(images[i][cut]) for i in index]
    else:
        top = left = 0
        chosen = crop_common([images[i] for i in index])
        cut = (slice(0, chosen[0].shape[0]), slice(0, chosen[0].shape[1]))
    K = cams.K[index].copy()
    K[:, 0, 2] -= left
    K[:, 1, 2] -= top
    depths = [load_depth(work / "depth", "median", n)[cut] for n in names]
    return names, chosen, depths, K, cams.T[index]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dir", type=Path, help="a scene's work folder (geometry and relations stages run)")
    ap.add_argument("--snapshot", action="append", required=True, metavar="CLIPS:PATH")
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--crop", type=int, default=0, help="centre crop side (0: whole views)")
    ap.add_argument("--out", type=Path, required=True, help="CSV; the plot goes beside it as .png")
    args = ap.parse_args()
    names, images, depths, K, T = first_views(args.work_dir, args.views, args.crop)
    setting = {"scene": args.work_dir.name, "views": args.views, "crop": args.crop}
    given = {int(spec.split(":", 1)[0]) for spec in args.snapshot}
    rows = [r for r in earlier_rows(args.out) if {k: r[k] for k in setting} == setting and r["clips"] not in given]
    anchor = measure(SeparateCodec(names, K, T), images, names, log=lambda s: None)
    for spec in args.snapshot:
        clips, path = spec.split(":", 1)
        joint = JointEvalCodec(names, K, T, depths, model_id=Path(path).name, codec=checkpoint_codec(Path(path)))
        curve = measure(joint, images, names, log=lambda s: None)
        bd = curve_bd_rates(anchor, curve)
        for a, j in zip(anchor.points, curve.points):
            row = {**setting, "clips": int(clips), "snapshot": path, "quality": j.quality,
                   **{f"bd_{m.replace('-', '_')}": bd[m] if isinstance(bd[m], float) else float("nan") for m in METRICS},
                   "bytes_vs_single": sum(j.num_bytes) / sum(a.num_bytes) - 1,
                   "psnr_delta": j.mean_psnr - a.mean_psnr}
            rows.append(row)
            print(f"{clips:>6} clips q{j.quality}: bytes {100 * row['bytes_vs_single']:+.1f} %, "
                  f"PSNR {row['psnr_delta']:+.2f} dB")
        print(format_bd_rates({f"{clips} clips": bd}, "the single-view codec"))
    rows.sort(key=lambda r: (r["clips"], r["quality"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{args.work_dir.name}: first {args.views} views" + (f", {args.crop}² crops" if args.crop else "")
    plot(rows, args.out.with_suffix(".png"), title)


def earlier_rows(path: Path) -> list[dict]:
    """The rows of an earlier run of this benchmark (numbers parsed), to which new snapshots are added."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: v if k in ("scene", "snapshot") else (int(v) if k in ("views", "crop", "clips", "quality") else float(v))
                 for k, v in r.items()} for r in csv.DictReader(f)]


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    per_snapshot = {r["clips"]: r for r in rows}
    clips = sorted(per_snapshot)
    for key, label in (("bd_psnr", "PSNR"), ("bd_ms_ssim", "MS-SSIM")):
        ax[0].plot(clips, [per_snapshot[c][key] for c in clips], "o-", label=label)
    ax[0].set(xlabel="training clips seen (4-view clips)", ylabel="BD-rate vs single-view codec (%)",
              title="joint codec vs coding each view alone")
    for q in sorted({r["quality"] for r in rows}):
        mine = sorted((r for r in rows if r["quality"] == q), key=lambda r: r["clips"])
        ax[1].plot([r["clips"] for r in mine], [100 * r["bytes_vs_single"] for r in mine], "o-", label=f"q{q}")
    ax[1].set(xlabel="training clips seen", ylabel="bytes vs single-view codec (%)", title="per quality")
    for a in ax:
        a.axhline(0, color="k", lw=0.6)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
