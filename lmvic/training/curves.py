"""Plot a run's ``train.csv`` and ``val.csv`` to ``curves.png`` (loss, bpp, PSNR vs CPU-minutes)."""
from __future__ import annotations

import csv
from pathlib import Path


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a numeric CSV as dicts of floats ([] when the file does not exist)."""
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_run(run_dir: Path) -> Path:
    """Write ``run_dir/curves.png``: training loss, training bpp/PSNR, validation PSNR per quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_csv(run_dir / "train.csv")
    val = read_csv(run_dir / "val.csv")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        t = [r["cpu_min"] for r in train]
        axes[0].plot(t, [r["loss"] for r in train])
        axes[0].set(xlabel="CPU-minutes", ylabel="train loss (λ·255²·MSE + bpp)", yscale="log")
        axes[1].plot(t, [r["psnr"] for r in train], label="PSNR (dB)")
        ax2 = axes[1].twinx()
        ax2.plot(t, [r["bpp"] for r in train], color="tab:orange", label="bpp")
        axes[1].set(xlabel="CPU-minutes", ylabel="train PSNR (dB)")
        ax2.set_ylabel("train bpp")
    for q in sorted({int(r["quality"]) for r in val}):
        rows = [r for r in val if int(r["quality"]) == q]
        axes[2].plot([r["bpp"] for r in rows], [r["psnr"] for r in rows], marker=".", label=f"q{q}")
        axes[2].annotate(f"{rows[-1]['cpu_min']:.0f}′", (rows[-1]["bpp"], rows[-1]["psnr"]))
    axes[2].set(xlabel="validation bpp (likelihoods)", ylabel="validation PSNR (dB)",
                title="held-out crops; points move with training")
    if val:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
