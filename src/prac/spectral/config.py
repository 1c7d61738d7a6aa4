"""Settings of the Fisher spectral analysis (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prac.core.errors import PracError

SAMPLE_UNITS = ("sequence", "token")
REDUCTIONS = ("sum", "mean")
FISHER_TYPES = ("empirical", "mc")
ENGINES = ("auto", "vmap", "loop")
EIGENSOLVE_DEVICES = ("auto", "cpu", "cuda")
BLOCK_STRUCTURES = ("layer", "layer_type", "model")


@dataclass(frozen=True)
class SpectralConfig:
    """What is differentiated, how the samples are formed, and how the spectrum is solved.

    Sample definition
        sample_unit: ``"sequence"`` — gᵢ = ∇θ ℓᵢ with ℓᵢ the loss of sequence i (default);
            ``"token"`` — every predicted token is its own sample (N = number of valid tokens).
        per_sample_reduction: ``"sum"`` — ℓᵢ = Σ_t CE(i, t) over the sequence's valid tokens
            (default; the scale of F = (1/N) Σᵢ gᵢgᵢᵀ then does not depend on the batch);
            ``"mean"`` — ℓᵢ = Σ_t CE(i, t) / #valid tokens of i. Irrelevant for ``sample_unit="token"``.
        fisher_type: ``"empirical"`` — targets are the observed next tokens;
            ``"mc"`` — one target per position drawn from the model's own predictive distribution
            (seeded): a one-sample Monte-Carlo estimate of the true Fisher (Kunstner et al., 2019).
        shift_labels: causal-LM convention, logits at t score the token at t+1. Set False for heads
            that score the token at the same position (masked LM).

    Coordinates
        max_params_per_block: keep at most this many coordinates of each block, drawn uniformly
            without replacement with a seed from a sha1 hash of the block key. The eigenvalues are
            then those of the principal submatrix F[S, S], not of F. None = every coordinate.

    Solver
        top_k_eigenvalues: None = all eigenvalues, exact (``eigvalsh`` of the Gram matrix);
            k = the k largest through seeded ``torch.svd_lowrank`` (approximate).
        svd_oversample, svd_niter: extra subspace columns and power iterations of ``svd_lowrank``.
        eigensolve_device: ``auto`` = where the gradients live; ``cpu``; ``cuda``.
        failure_jitter: smallest diagonal shift added *only* when ``eigvalsh`` fails on the device
            and again on the CPU in float64 (the shift is subtracted back and recorded).
        rank_rtol: eigenvalues ≤ rank_rtol·λmax count as zero for the condition number and the
            numerical rank; None = n·eps(float64) with n the Gram size.

    Execution
        gradient_engine: ``vmap`` (torch.func, batched), ``loop`` (one backward per sample) or
            ``auto`` (vmap, and the loop when the model has no batching rule for some operation).
        chunk_size: sequences per vmap call (tokens per vectorised backward for ``sample_unit="token"``).
        streaming: never hold the gradients of the whole model: the coordinates are processed in
            slices of at most ``stream_budget_mb`` of float64 gradients, recomputing the per-sample
            gradients for each slice, and only the N×N Gram of each block is kept.
        whole_model: also report the spectrum of the whole model (the sum of the block Grams).
        seed: seeds MC targets, coordinate subsampling and ``svd_lowrank``.
        use_deterministic: ``torch.use_deterministic_algorithms(True)`` and
            ``CUBLAS_WORKSPACE_CONFIG`` for the duration of the computation.
    """

    sample_unit: str = "sequence"
    per_sample_reduction: str = "sum"
    fisher_type: str = "empirical"
    shift_labels: bool = True
    max_params_per_block: int | None = None
    top_k_eigenvalues: int | None = None
    svd_oversample: int = 10
    svd_niter: int = 4
    eigensolve_device: str = "auto"
    failure_jitter: float = 0.0
    rank_rtol: float | None = None
    gradient_engine: str = "auto"
    chunk_size: int = 8
    streaming: bool = False
    stream_budget_mb: float = 512.0
    whole_model: bool = True
    seed: int = 0
    use_deterministic: bool = False

    def __post_init__(self) -> None:
        _choice("sample_unit", self.sample_unit, SAMPLE_UNITS)
        _choice("per_sample_reduction", self.per_sample_reduction, REDUCTIONS)
        _choice("fisher_type", self.fisher_type, FISHER_TYPES)
        _choice("gradient_engine", self.gradient_engine, ENGINES)
        _choice("eigensolve_device", self.eigensolve_device, EIGENSOLVE_DEVICES)
        if self.max_params_per_block is not None and self.max_params_per_block < 1:
            raise PracError(f"max_params_per_block must be >= 1 or None, got {self.max_params_per_block}")
        if self.top_k_eigenvalues is not None and self.top_k_eigenvalues < 1:
            raise PracError(f"top_k_eigenvalues must be >= 1 or None (all eigenvalues), got {self.top_k_eigenvalues}")
        if self.chunk_size < 1:
            raise PracError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.svd_oversample < 0 or self.svd_niter < 0:
            raise PracError("svd_oversample and svd_niter must be >= 0")
        if self.stream_budget_mb <= 0:
            raise PracError(f"stream_budget_mb must be > 0, got {self.stream_budget_mb}")
        if self.failure_jitter < 0:
            raise PracError(f"failure_jitter must be >= 0, got {self.failure_jitter}")
        if self.rank_rtol is not None and not 0 <= self.rank_rtol < 1:
            raise PracError(f"rank_rtol must be in [0, 1) or None, got {self.rank_rtol}")

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PracError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
