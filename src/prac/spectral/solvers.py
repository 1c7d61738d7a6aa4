"""Spectra of F = (1/N) GᵀG through the Gram matrix K = (1/N) GGᵀ, and the metrics derived from them.

G ∈ ℝ^{N×P} holds one per-sample gradient per row. GᵀG and GGᵀ share their non-zero eigenvalues
(both are σ_j(G)²), so F's spectrum comes from the N×N matrix K at O(N²P + N³) instead of
O(P³). F has P eigenvalues, K has N; the min(N, P) largest of each coincide and the rest are zero,
so exactly min(N, P) eigenvalues are reported.

Everything here is a pure function on float64 tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch

from prac.core.errors import PracError

log = logging.getLogger(__name__)

EPS64 = torch.finfo(torch.float64).eps
_eigvalsh = torch.linalg.eigvalsh  # module attribute so tests can make it fail on purpose


@dataclass
class SolveInfo:
    """How a spectrum was obtained: solver, device, and every fallback that was taken."""

    solver: str
    device: str
    exact: bool
    attempts: list[str] = field(default_factory=list)
    cpu_retry: bool = False
    jitter: float = 0.0
    k_requested: int | None = None
    k_used: int | None = None
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """Unnormalised Gram GGᵀ in float64 (callers divide the sum over blocks/slices by N once)."""
    rows = rows.to(torch.float64)
    return rows @ rows.T


def eigvalsh_descending(K: torch.Tensor, device: torch.device, failure_jitter: float = 0.0
                        ) -> tuple[torch.Tensor, SolveInfo]:
    """All eigenvalues of the symmetric K (float64, descending, on the CPU).

    No regularisation unless the solver fails: first a retry on the CPU in float64, then a diagonal
    shift ε (max of ``failure_jitter`` and 10·eps·max diag K) whose eigenvalues are shifted back by
    ε. Every attempt is recorded in the returned :class:`SolveInfo`.
    """
    K = K.to(torch.float64)
    if not torch.isfinite(K).all():
        raise PracError("the Gram matrix contains NaN or Inf: the per-sample gradients are not finite "
                        "(fully masked attention rows, e.g. left padding with SDPA, are a common cause)")
    info = SolveInfo("eigvalsh", str(device), exact=True)
    tries = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    for dev in tries:
        try:
            values = _eigvalsh(K.to(dev))
            info.attempts.append(f"eigvalsh on {dev}: ok")
            info.device = str(dev)
            info.cpu_retry = dev != tries[0]
            return values.flip(0).cpu(), info
        except RuntimeError as exc:  # LinAlgError, cuSOLVER and CUDA OOM errors are RuntimeErrors
            info.attempts.append(f"eigvalsh on {dev}: failed ({_first_line(exc)})")
            log.warning("eigvalsh failed on %s: %s", dev, _first_line(exc))
    scale = float(K.diagonal().abs().max()) if K.numel() else 0.0
    jitter = max(failure_jitter, 10 * EPS64 * max(scale, 1e-300))
    try:
        values = _eigvalsh(K.cpu() + jitter * torch.eye(K.shape[0], dtype=torch.float64)) - jitter
    except RuntimeError as exc:
        raise PracError(f"eigvalsh failed even with a diagonal jitter of {jitter:.3g}: {_first_line(exc)}") from exc
    log.warning("eigvalsh succeeded only with a diagonal jitter of %.3g (shifted back, recorded)", jitter)
    info.attempts.append(f"eigvalsh on cpu with jitter {jitter:.3g}: ok (eigenvalues shifted back by the jitter)")
    info.device, info.cpu_retry, info.jitter = "cpu", True, jitter
    return values.flip(0), info


def topk_svd(matrix: torch.Tensor, k: int, seed: int, oversample: int, niter: int, device: torch.device,
             squared: bool) -> tuple[torch.Tensor, SolveInfo]:
    """The k largest eigenvalues by seeded randomized SVD (Halko et al.; ``torch.svd_lowrank``).

    ``squared=True``: ``matrix`` is G/√N and the eigenvalues of F are σ². ``squared=False``:
    ``matrix`` is the PSD Gram K itself, whose singular values are its eigenvalues.
    k is clipped to min(rows, cols); with nothing left (an empty block) the result is empty, with
    a warning, rather than a crash or a made-up zero.
    """
    info = SolveInfo("svd_lowrank", str(device), exact=False, k_requested=k, seed=seed)
    rank_cap = min(matrix.shape) if matrix.dim() == 2 else 0
    k_used = min(k, rank_cap)
    info.k_used = k_used
    if k_used < 1:
        log.warning("svd_lowrank: k=%d leaves nothing to compute for a %s matrix; empty spectrum", k_used,
                    tuple(matrix.shape))
        info.attempts.append(f"skipped: k={k_used} < 1")
        return torch.zeros(0, dtype=torch.float64), info
    q = min(k_used + oversample, rank_cap)
    mat = matrix.to(device=device, dtype=torch.float64)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded without touching the caller's RNG state
        torch.manual_seed(seed)
        _, s, _ = torch.svd_lowrank(mat, q=q, niter=niter)
    values = (s**2 if squared else s)[:k_used].cpu()
    info.attempts.append(f"svd_lowrank q={q} niter={niter} on {device}: ok")
    return values.sort(descending=True).values, info


@dataclass
class Metrics:
    """Scalars of one spectrum (NaN where a partial spectrum cannot define them)."""

    top_eigenvalue: float
    trace: float
    condition_number: float
    effective_rank: float
    stable_rank: float
    numerical_rank: int
    tol: float

    def to_dict(self) -> dict:
        return asdict(self)


def spectrum_metrics(eigenvalues: torch.Tensor, trace: float, gram_size: int, exact: bool,
                     rank_rtol: float | None = None) -> Metrics:
    """Metrics of a descending spectrum λ (negative round-off clamped to 0 as λ⁺).

    - trace: passed in, computed exactly as ‖G‖²_F / N whatever the solver.
    - condition number: λmax / λmin over the eigenvalues above tol = λmax · rtol, rtol defaulting
      to n·eps with n the Gram size. The centred Gram always has an exact zero eigenvalue (it
      annihilates the all-ones vector), so the smallest eigenvalue itself is never used.
    - effective rank: exp(−Σ pⱼ log pⱼ), pⱼ = λⱼ⁺ / Σ λ⁺ (Roy & Vetterli, 2007).
    - stable rank: tr F / λmax = ‖G‖²_F / ‖G‖²₂.
    Condition number and effective rank need the whole spectrum: NaN for a top-k solve.
    """
    lam = eigenvalues.to(torch.float64).clamp(min=0)
    lmax = float(lam[0]) if lam.numel() else 0.0
    rtol = rank_rtol if rank_rtol is not None else max(gram_size, 1) * EPS64
    tol = lmax * rtol
    above = lam[lam > tol]
    rank = int(above.numel())
    nan = float("nan")
    cond = lmax / float(above[-1]) if exact and rank >= 1 else nan
    if exact:
        total = float(lam.sum())
        if total > 0:
            p = lam[lam > 0] / total
            erank = math.exp(float(-(p * p.log()).sum()))
        else:
            erank = 0.0
    else:
        erank = nan
    stable = trace / lmax if lmax > 0 else 0.0
    return Metrics(lmax, float(trace), cond, erank, stable, rank, tol)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
