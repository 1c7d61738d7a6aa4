"""Publication figure of a :class:`SpectralResult`: eigenvalue-vs-rank curves and per-layer heatmaps.

Left: λ_k against k on log–log axes, one curve per block (layers coloured by depth, line style by
attention / MLP / other; embedding, head and the whole model drawn distinctly). Right: layer ×
{attention, mlp} heatmaps of the top eigenvalue and of the trace (log colour scale). Drawn with
the object-oriented Agg canvas, so importing this never changes the global pyplot backend.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from prac.spectral.result import BlockSpectrum, SpectralResult

_KEY = re.compile(r"^(?:(?P<stack>.+)\.)?layer_(?P<index>\d+)(?:\.(?P<kind>attention|mlp|other))?$")
_STYLE = {"attention": "-", "mlp": "--", "other": ":", None: "-"}
_SPECIAL = {"embedding": ("#d62728", "embedding"), "head": ("#9467bd", "head"), "other": ("#7f7f7f", "other (final norm …)"),
            "model": ("#000000", "model")}


def parse_key(key: str) -> tuple[str | None, int, str | None] | None:
    """``(stack, layer index, kind)`` of a layer block key, else None."""
    m = _KEY.match(key)
    if m is None:
        return None
    return m.group("stack"), int(m.group("index")), m.group("kind")


def _positive(b: BlockSpectrum) -> np.ndarray:
    v = b.eigenvalues.double().numpy()
    return v[v > max(b.tol, 0.0)] if v.size else v


def heatmap_table(result: SpectralResult, metric: str) -> tuple[list[str], list[str], np.ndarray] | None:
    """Rows (layers), columns (attention, mlp — or ``layer`` for per-layer blocks) and values."""
    cells: dict[tuple[str, str], float] = {}
    rows: dict[str, tuple] = {}
    for key, b in result.blocks.items():
        parsed = parse_key(key)
        if parsed is None:
            continue
        stack, index, kind = parsed
        if kind == "other":
            continue
        row = f"{stack + '.' if stack else ''}{index}"
        rows[row] = (stack or "", index)
        cells[(row, kind or "layer")] = float(getattr(b, metric))
    if not cells:
        return None
    cols = [c for c in ("attention", "mlp", "layer") if any(k[1] == c for k in cells)]
    row_names = sorted(rows, key=lambda r: rows[r])
    table = np.full((len(row_names), len(cols)), np.nan)
    for (r, c), v in cells.items():
        table[row_names.index(r), cols.index(c)] = v
    return row_names, cols, table


def _title(result: SpectralResult) -> str:
    m = result.metadata
    what = "covariance" if m.get("centered") else ("Fisher" if m.get("fisher_type") != "mc" else "MC Fisher")
    if m.get("fisher_type") == "empirical":
        what = "empirical " + what
    unit = m.get("sample_unit")
    parts = [f"{what} spectrum"]
    if unit:
        parts.append(f"per {unit}")
    if m.get("n_samples_used") is not None:
        parts.append(f"N = {m['n_samples_used']}")
    if m.get("subsampling", {}).get("blocks"):
        parts.append(f"≤ {m['subsampling']['max_params_per_block']} coords/block")
    return ", ".join(parts)


def draw(result: SpectralResult, figsize: tuple[float, float] | None = None):
    """A matplotlib ``Figure`` (not attached to pyplot)."""
    from matplotlib import cm, colormaps, colors
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    tables = [heatmap_table(result, "top_eigenvalue"), heatmap_table(result, "trace")]
    has_maps = tables[0] is not None
    ncols = 3 if has_maps else 1
    fig = Figure(figsize=figsize or ((13.5, 4.6) if has_maps else (6.0, 4.6)), dpi=200, layout="constrained")
    widths = [2.2, 1, 1] if has_maps else [1]
    axes = fig.subplots(1, ncols, gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    ax = axes[0]
    layers = [parse_key(k)[1] for k in result.blocks if parse_key(k) is not None]
    lo, hi = min(layers, default=0), max(layers, default=0)
    cmap = colormaps["viridis"]
    # one discrete colour per layer so the colour bar reads as layer indices
    depth = colors.BoundaryNorm(np.arange(lo - 0.5, hi + 1.5), cmap.N)
    kinds_seen = set()
    specials = []
    for key, b in result.blocks.items():
        lam = _positive(b)
        if lam.size == 0:
            continue
        ranks = np.arange(1, lam.size + 1)
        parsed = parse_key(key)
        if parsed is not None:
            kinds_seen.add(parsed[2])
            ax.plot(ranks, lam, _STYLE[parsed[2]], color=cmap(depth(parsed[1])), lw=1.1, alpha=0.9)
        else:
            color, label = _SPECIAL.get(key, ("#ff7f0e", key))
            ax.plot(ranks, lam, "-", color=color, lw=1.4, marker="o", ms=2.2, label=label)
            specials.append(label)
    if result.whole_model is not None and len(result.blocks) > 1:
        lam = _positive(result.whole_model)
        if lam.size:
            ax.plot(np.arange(1, lam.size + 1), lam, "-", color="black", lw=2.2, label="whole model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank k")
    ax.set_ylabel(r"eigenvalue $\lambda_k$")
    ax.set_title(_title(result), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    for kind in ("attention", "mlp", "other", None):
        if kind in kinds_seen:
            handles.append(Line2D([], [], color="0.3", ls=_STYLE[kind], label=kind or "layer"))
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="lower left", frameon=False)
    if layers:
        sm = cm.ScalarMappable(norm=depth, cmap=cmap)
        ticks = np.arange(lo, hi + 1, max(1, math.ceil((hi - lo + 1) / 12)))
        fig.colorbar(sm, ax=ax, label="layer", pad=0.01, fraction=0.04, ticks=ticks)
    if has_maps:
        for axh, table, label in zip(axes[1:], tables, ("top eigenvalue", "trace")):
            _heatmap(fig, axh, table, label)
    return fig


def _heatmap(fig, ax, table, label: str) -> None:
    from matplotlib import colors

    rows, cols, values = table
    finite = values[np.isfinite(values) & (values > 0)]
    norm = colors.LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001)) if finite.size else None
    shown = np.where(values > 0, values, np.nan)
    image = ax.imshow(shown, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols)
    step = max(1, math.ceil(len(rows) / 16))
    ax.set_yticks(range(0, len(rows), step), rows[::step])
    ax.set_ylabel("layer")
    ax.set_title(label, fontsize=9)
    if len(rows) <= 16 and len(cols) <= 3:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(values[i, j]):
                    mid = norm is not None and values[i, j] > 0 and norm(values[i, j]) > 0.5
                    ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", fontsize=6.5,
                            color="black" if mid else "white")
    fig.colorbar(image, ax=ax, pad=0.02, fraction=0.08)


def save_plot(result: SpectralResult, path: str | Path, format: str | None = None) -> Path:
    """Write the figure; ``format`` (png, pdf, svg) defaults to the suffix of ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    fig = draw(result)
    FigureCanvasAgg(fig)
    from prac.io.outputs import figure_metadata

    fig.savefig(path, bbox_inches="tight", format=format,
                metadata=figure_metadata(format or path.suffix[1:] or "png"))
    return path
