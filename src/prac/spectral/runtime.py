"""Where and how a spectrum is computed: the model's and the eigensolver's devices, deterministic
algorithms and eval mode for the duration of the computation (the previous state restored after).
"""

from __future__ import annotations

import contextlib
import os

import torch

from prac.core.errors import PracError


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its gradients are formed)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise PracError("the model has no parameters") from None


def solve_device(spec: str) -> torch.device | None:
    """The eigensolver's device for ``eigensolve_device``: None for ``auto`` (where the Gram lives)."""
    if spec == "auto":
        return None  # where the Gram lives, i.e. the gradients' device
    if spec == "cuda" and not torch.cuda.is_available():
        raise PracError("eigensolve_device='cuda' but CUDA is not available")
    return torch.device(spec)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """Deterministic algorithms (and the cuBLAS workspace they require) for the block, then restore.

    ``CUBLAS_WORKSPACE_CONFIG`` only takes effect if set before cuBLAS is first used in the
    process; the CLI sets it before anything touches CUDA.
    """
    if not enabled:
        yield None
        return
    prev_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield os.environ["CUBLAS_WORKSPACE_CONFIG"]
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        if prev_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev_env


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module | None):
    """model.eval() for the computation (see :data:`prac.spectral.metadata.EVAL_NOTE`), the previous
    mode restored afterwards."""
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
