"""The figure of a sparsity plan: sparsity per block, one line per projection."""

from __future__ import annotations

from pathlib import Path

from prac.io.outputs import figure_metadata
from prac.jobs.allocation import Plan


def save_allocation_plot(plan: Plan, path: str | Path, format: str | None = None) -> None:
    """Sparsity of every linear against its block index, one marker line per projection name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for name, s in plan.sparsity.items():
        series.setdefault(name.rsplit(".", 1)[-1], []).append((plan.block_of[name], s))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for proj, points in series.items():
        points.sort()
        ax.plot([b for b, _ in points], [s for _, s in points], marker="o", ms=3, lw=1, label=proj)
    ax.axhline(plan.target, color="black", lw=0.8, ls="--", label=f"target {plan.target:g}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title(f"{plan.method} allocation: total {plan.total():.4f}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, format=format, dpi=120, metadata=figure_metadata(format or Path(path).suffix[1:] or "png"))
    plt.close(fig)
