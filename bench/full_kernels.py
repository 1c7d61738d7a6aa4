"""The two kernel choices inside ``full``'s solve, timed on their own (CPU or CUDA).

For ``--rows`` rows of an ``--in``-wide layer with ``--k`` selected columns each (random, as a 20%
selection of 50% survivors gives k = in / 10), it times

- gathering every row's K x K block of H with the columns in score (random) order vs ascending
  column order (``full`` uses the latter), and
- ``cholesky_solve`` vs two ``solve_triangular`` calls on the factored blocks (``full`` uses the
  latter; the results are identical),

and prints seconds scaled to ``--out`` rows.

    OMP_NUM_THREADS=1 python bench/full_kernels.py                 # in 4096, k 410, 512 rows timed
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="in_features", type=int, default=4096)
    ap.add_argument("--k", type=int, default=410)
    ap.add_argument("--rows", type=int, default=512, help="rows timed")
    ap.add_argument("--out", type=int, default=4096, help="rows the printed seconds are scaled to")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    n, k, rows = args.in_features, args.k, args.rows
    a = torch.randn(n, n, device=device, generator=g) / n**0.5
    h = a @ a.T + torch.eye(n, device=device)
    scored = torch.stack([torch.randperm(n, device=device, generator=g)[:k] for _ in range(rows)])
    ascending = scored.sort(dim=1).values
    scale = args.out / rows

    t_random, _ = timed(lambda: h[scored.unsqueeze(2), scored.unsqueeze(1)], device)
    t_sorted, blocks = timed(lambda: h[ascending.unsqueeze(2), ascending.unsqueeze(1)], device)
    print(f"gather {args.out} x {k} x {k}: score order {t_random * scale:.2f} s, "
          f"column order {t_sorted * scale:.2f} s ({t_random / t_sorted:.1f}x)")

    t_chol, factor = timed(lambda: torch.linalg.cholesky(blocks), device)
    b = torch.randn(rows, k, 1, device=device, generator=g)
    t_cs, x1 = timed(lambda: torch.cholesky_solve(b, factor), device)

    def triangular() -> torch.Tensor:
        y = torch.linalg.solve_triangular(factor, b, upper=False)
        return torch.linalg.solve_triangular(factor.mT, y, upper=True)

    t_tri, x2 = timed(triangular, device)
    print(f"batched Cholesky: {t_chol * scale:.2f} s")
    print(f"solve: cholesky_solve {t_cs * scale:.2f} s, two solve_triangular {t_tri * scale:.2f} s "
          f"({t_cs / t_tri:.1f}x), max difference {float((x1 - x2).abs().max()):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
