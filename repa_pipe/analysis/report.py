"""The analysis as a terminal table, a plot and a JSON file."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from repa_pipe.analysis.alignment import Analysis
from repa_pipe.pipeline.fileio import atomic_write, atomic_write_json


def render_table(a: Analysis, out: Console) -> None:
    """One row per block: CKNNA and probe accuracy at each t; the aligned block is starred."""
    table = Table(title=f"CKNNA (k={a.meta['topk']}) with {a.features} and linear-probe accuracy, "
                        f"{a.num_samples} rows", title_justify="left")
    table.add_column("block", justify="right")
    for t in a.times:
        table.add_column(f"CKNNA t={t:g}", justify="right")
    for t in a.times:
        table.add_column(f"probe t={t:g}", justify="right")
    for j, b in enumerate(a.blocks):
        mark = "*" if b == a.aligned_block else ""
        table.add_row(f"{b}{mark}", *(f"{a.cknna[i][j]:.3f}" for i in range(len(a.times))),
                      *(f"{a.probe[i][j]:.3f}" for i in range(len(a.times))))
    out.print(table)
    aligned = f"; * = the block REPA aligned ({a.aligned_block})" if a.aligned_block else "; a baseline run"
    out.print(f"probe accuracy of the cached features themselves: {a.encoder_probe:.3f}{aligned}", highlight=False)


def save_plot(a: Analysis, path: Path) -> None:
    """CKNNA and probe accuracy against block, one line per t (as the paper's Figures 2 and 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, t in enumerate(a.times):
        ax1.plot(a.blocks, a.cknna[i], marker="o", ms=3, label=f"t={t:g}")
        ax2.plot(a.blocks, a.probe[i], marker="o", ms=3, label=f"t={t:g}")
    ax2.axhline(a.encoder_probe, color="gray", ls=":", label=f"{a.features.split('/')[-1]} features")
    for ax, name in ((ax1, f"CKNNA with {a.features} (k={a.meta['topk']})"), (ax2, "linear-probe accuracy")):
        if a.aligned_block:
            ax.axvline(a.aligned_block, color="black", ls="--", lw=0.8)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def save(a: Analysis, folder: Path, stem: str) -> tuple[Path, Path]:
    """RUN/analysis/<stem>.json and .png."""
    js, png = Path(folder) / f"{stem}.json", Path(folder) / f"{stem}.png"
    atomic_write_json(js, a.to_json())
    save_plot(a, png)
    return js, png
