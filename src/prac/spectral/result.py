"""Result objects of the spectral analysis and their JSON / CSV forms."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prac.io.outputs import csv_header

CSV_FIELDS = csv_header(("block", "n_params", "n_params_used", "subsample_fraction", "n_eigenvalues", "top_eigenvalue",
              "trace", "condition_number", "effective_rank", "stable_rank", "numerical_rank", "tol",
              "eigenvalues_of", "solver", "jitter"))


@dataclass
class BlockSpectrum:
    """Spectrum of one block's F (or of its principal submatrix F[S, S] when subsampled).

    ``eigenvalues``: float64, descending, the min(N, |S|) largest (the others are exactly zero);
    for a top-k solve only the k largest. ``trace`` is exact (‖G‖²_F/N) for every solver.
    """

    key: str
    eigenvalues: torch.Tensor
    top_eigenvalue: float
    trace: float
    condition_number: float
    effective_rank: float
    stable_rank: float
    n_params: int
    n_params_used: int
    numerical_rank: int
    tol: float
    subsample_fraction: float = 1.0
    subsample_seed: int | None = None
    eigenvalues_of: str = "F"
    solve: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "key": self.key, "eigenvalues": [float(v) for v in self.eigenvalues.tolist()],
            "top_eigenvalue": self.top_eigenvalue, "trace": self.trace,
            "condition_number": self.condition_number, "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank, "n_params": self.n_params, "n_params_used": self.n_params_used,
            "numerical_rank": self.numerical_rank, "tol": self.tol,
            "subsample_fraction": self.subsample_fraction, "subsample_seed": self.subsample_seed,
            "eigenvalues_of": self.eigenvalues_of, "solve": self.solve,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BlockSpectrum:
        def num(x):
            return float("nan") if x is None else x
        return cls(d["key"], torch.tensor(d["eigenvalues"], dtype=torch.float64), num(d["top_eigenvalue"]),
                   num(d["trace"]), num(d["condition_number"]), num(d["effective_rank"]), num(d["stable_rank"]),
                   d["n_params"], d["n_params_used"], d["numerical_rank"], num(d["tol"]),
                   d.get("subsample_fraction", 1.0), d.get("subsample_seed"), d.get("eigenvalues_of", "F"),
                   d.get("solve", {}))


@dataclass
class SpectralResult:
    """Per-block spectra, the whole-model spectrum (sum of the block Grams) and the run's metadata."""

    blocks: dict[str, BlockSpectrum]
    whole_model: BlockSpectrum | None
    metadata: dict[str, Any]

    def __getitem__(self, key: str) -> BlockSpectrum:
        return self.blocks[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        """JSON-safe: tensors become lists, NaN/Inf become None."""
        return json_safe({
            "metadata": self.metadata,
            "blocks": {k: b.to_dict() for k, b in self.blocks.items()},
            "whole_model": self.whole_model.to_dict() if self.whole_model is not None else None,
        })

    @classmethod
    def from_dict(cls, d: dict) -> SpectralResult:
        whole = d.get("whole_model")
        return cls({k: BlockSpectrum.from_dict(b) for k, b in d["blocks"].items()},
                   BlockSpectrum.from_dict(whole) if whole else None, d.get("metadata", {}))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    def csv_rows(self) -> list[dict]:
        items = list(self.blocks.values()) + ([self.whole_model] if self.whole_model is not None else [])
        rows = []
        for b in items:
            name = "whole_model" if b is self.whole_model else b.key
            rows.append({
                "block": name, "n_params": b.n_params, "n_params_used": b.n_params_used,
                "subsample_fraction": b.subsample_fraction, "n_eigenvalues": int(b.eigenvalues.numel()),
                "top_eigenvalue": b.top_eigenvalue, "trace": b.trace, "condition_number": b.condition_number,
                "effective_rank": b.effective_rank, "stable_rank": b.stable_rank,
                "numerical_rank": b.numerical_rank, "tol": b.tol, "eigenvalues_of": b.eigenvalues_of,
                "solver": b.solve.get("solver", ""), "jitter": b.solve.get("jitter", 0.0),
            })
        return rows

    def save_csv(self, path: str | Path) -> None:
        with Path(path).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in self.csv_rows():
                writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def json_safe(obj: Any) -> Any:
    """Recursively convert to JSON types; non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):  # numpy scalars
        return json_safe(obj.item())
    return str(obj)
