"""Joint-mode figures on held-out scenes: BD-rates against Separate, x265 LDP and AVIF, times, sizes.

Reads the results of ``lmvic eval SCENE --mode joint`` (``WORK/eval/<codec>.json``, CompressAI
layout) of each given work folder, and prints per scene the BD-rate (PSNR and MS-SSIM) of
``lmvic-joint`` against every other codec there and of x265 all-intra against x265 low-delay P (how
much the other views give a traditional codec on that scene), the joint codec's encode and decode
seconds per view, per rate point how many views it coded inter (with the reference) and what its
depth streams cost, what a later view costs against the first (also for Separate, which codes every
view alone, and for x265 low-delay P: its P-frames against its I-frame), and the shipped model's
size. Run the evaluations first, e.g.::

    lmvic eval ../shared/scenes/fox --work-dir W/fox --mode joint --max-views 8
    python benchmarks/joint.py W/fox W/sceaux
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmvic.scene_codec import PRIOR_STREAM
from lmvic.zoo import WEIGHTS_DIR
from pipelines.rd import curve_bd_rates, from_compressai_json

TEST = "lmvic-joint"
SEPARATE = "lmvic-single"
INTRA, LDP = "x265-intra", "x265-ldp"  # all-intra against low-delay P: the scene's inter-view gain for x265


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dirs", nargs="+", type=Path)
    ap.add_argument("--model", default="joint-cpu")
    args = ap.parse_args()
    weights = WEIGHTS_DIR / f"{args.model}.pt"
    print(f"model {args.model}: {weights.stat().st_size / 2**20:.1f} MiB ({weights})")
    for work in args.work_dirs:
        curves = {p.stem: from_compressai_json(json.loads(p.read_text())) for p in sorted((work / "eval").glob("*.json"))}
        if TEST not in curves:
            raise SystemExit(f"{work}: no {TEST}.json; run `lmvic eval SCENE --work-dir {work} --mode joint` first")
        test = curves[TEST]
        times = json.loads((work / "eval" / f"{TEST}.json").read_text())["results"]
        print(f"\n{work.name}: {len(test.views)} views; {TEST} encode {np.mean(times['encoding_time']):.2f} s/view, "
              f"decode {np.mean(times['decoding_time']):.2f} s/view")
        for point in test.points:
            if point.streams is None:
                continue  # measured before the eval recorded streams
            inter = sum("image" in v for v in point.streams[1:])  # the first view has no reference
            prior = sum(PRIOR_STREAM in v for v in point.streams[1:])
            depths = [v["depth"] for v in point.streams if "depth" in v]
            print(f"  q{point.quality}: of the {len(point.streams) - 1} views with a reference {inter} coded inter, "
                  f"{prior} with the reference in the entropy model only; "
                  f"depth streams in {len(depths)} views, {sum(depths)} B, "
                  f"{100 * sum(depths) / sum(point.num_bytes):.1f} % of the file")
        for name in (TEST, SEPARATE, LDP):  # what a view costs once its reference is decoded (Separate: none)
            if name in curves:
                print(f"  {name}: the later views' mean bytes over the first view's: " + ", ".join(
                    f"{point.quality:g}: {100 * np.mean(point.num_bytes[1:]) / point.num_bytes[0]:.0f} %"
                    for point in curves[name].points))
        pairs = [(TEST, name) for name in curves if name != TEST]
        if {INTRA, LDP} <= set(curves):
            pairs.append((INTRA, LDP))  # what the other views give a traditional codec on this scene
        for name, anchor in pairs:
            bd = curve_bd_rates(curves[anchor], curves[name])
            print(f"  BD-rate of {name} vs {anchor:<18} " + "  ".join(
                f"{metric}: {value:+.1f} %" if isinstance(value, float) else f"{metric}: n/a ({value})"
                for metric, value in bd.items()))


if __name__ == "__main__":
    main()
