"""Block-sequential ADMM (``--admm-sweep blocks``): its sweep's algebra against float64, its place
between the global ADMM and SparseGPT, and its settings and command-line errors."""

import pytest
import torch

from prac.cli import main
from prac.core.errors import PracError
from prac.correction.objective import relative_error
from prac.engine.pipeline import PruneConfig
from prac.methods.admm import ADMMSettings
from prac.methods.admm_blocks import block_admm
from prac.methods.patterns import NM, Unstructured
from prac.methods.sparsegpt import SparseGPTConfig

from . import test_admm
from .test_admm import D_IN, D_OUT, group_of, prune

layer = test_admm.layer  # test_admm's fixture, registered here so the tests below can take `layer`

BLOCKS = ADMMSettings(sweep="blocks", blocksize=16)  # 4 blocks of the 64 inputs
BLOCKS_NONE = ADMMSettings(sweep="blocks", blocksize=16, final="none")


def damped_upper(h: torch.Tensor, lam: float) -> torch.Tensor:
    """U with (H + λI)⁻¹ = UᵀU, in float64."""
    a = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(a), upper=True)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)], ids=str)
def test_error_estimate_is_the_damped_objective_increase(layer, pattern):
    """Σ Err² must equal Σᵢ (wᵢ − w₀ᵢ)(H + λI)(wᵢ − w₀ᵢ)ᵀ exactly: the lazy updates compensate every block
    optimally, so a wrong Schur quadratic, triangular solve or update would break the equality."""
    x, w = layer
    xd, wd = x.double(), w.double()
    h = xd.T @ xd / x.shape[0]
    lam = 0.01 * float(h.diagonal().mean())
    swept, mask, info = block_admm(wd, damped_upper(h, lam), torch.zeros(D_IN, dtype=torch.bool), pattern, BLOCKS)
    change = swept - wd
    objective = float(((change @ (h + lam * torch.eye(D_IN, dtype=h.dtype))) * change).sum())
    assert info["error_estimate"] == pytest.approx(objective, rel=1e-9)
    assert (swept[mask] == 0).all() and info["admm_blocks"] == 4


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)], ids=str)
def test_blocks_beat_sparsegpt_and_the_exact_final_solve_only_helps(layer, pattern):
    x, w = layer
    h = (x.T @ x) / x.shape[0]
    errors = {}
    for name, method, settings in [("sparsegpt", "sparsegpt", SparseGPTConfig(blocksize=16)),
                                   ("none", "admm", BLOCKS_NONE), ("exact", "admm", BLOCKS)]:
        result = prune(method, w, group_of(x), pattern, settings)
        assert result.mask.float().mean() == pytest.approx(pattern.target_sparsity, abs=1 / D_IN)
        assert (result.weight[result.mask] == 0).all()
        errors[name] = relative_error(result.weight, w, h)
    assert errors["exact"] <= errors["none"] * (1 + 1e-6) and errors["none"] < errors["sparsegpt"], errors


def test_nm_and_per_block_budgets_and_bit_identical_reruns(layer):
    x, w = layer
    first = prune("admm", w, group_of(x), NM(2, 4), BLOCKS_NONE)
    second = prune("admm", w, group_of(x), NM(2, 4), BLOCKS_NONE)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)
    assert ((~first.mask).reshape(D_OUT, D_IN // 4, 4).sum(-1) == 2).all()
    layer_scope = prune("admm", w, group_of(x), Unstructured(0.75), BLOCKS_NONE)
    for i1 in range(0, D_IN, 16):  # one budget per block, all rows together
        assert int(layer_scope.mask[:, i1:i1 + 16].sum()) == round(D_OUT * 16 * 0.75)
    row_scope = prune("admm", w, group_of(x), Unstructured(0.75), ADMMSettings(sweep="blocks", blocksize=16, scope="row"))
    assert (row_scope.mask.reshape(D_OUT, 4, 16).sum(-1) == 12).all()


def test_one_factorisation_shared_with_sparsegpt(layer):
    x, w = layer
    group = group_of(x)
    for _ in range(3):
        prune("admm", w, group, Unstructured(0.5), BLOCKS_NONE)
    prune("sparsegpt", w, group, Unstructured(0.5), SparseGPTConfig())
    assert group.factorisations == 1
    prune("admm", w, group, Unstructured(0.5), BLOCKS)  # the exact final solve adds the damped inverse
    assert group.factorisations == 2


def test_bad_settings_are_one_line_errors():
    with pytest.raises(PracError, match="sweep"):
        ADMMSettings(sweep="rows")
    with pytest.raises(PracError, match="final none needs sweep blocks"):
        ADMMSettings(final="none")
    with pytest.raises(PracError, match="blocksize"):
        ADMMSettings(sweep="blocks", blocksize=0)
    with pytest.raises(PracError, match="multiple of M=4"):
        PruneConfig(method="admm", pattern=NM(2, 4), settings=ADMMSettings(sweep="blocks", blocksize=6))
    PruneConfig(method="admm", pattern=NM(2, 4), settings=ADMMSettings(blocksize=6))  # global: no column blocks


@pytest.mark.parametrize("extra,needle", [(["--admm-final", "none"], "final none needs sweep blocks"),
                                          (["--admm-sweep", "blocks", "--nm", "2:4", "--blocksize", "6"], "multiple of M=4"),
                                          (["--admm-sweep", "blocks", "--method", "sparsegpt"], "--admm-sweep")])
def test_cli_refuses_before_any_work(extra, needle, tmp_path, capsys):
    argv = ["prune", "--no-progress", "--method", "admm", "--model", str(tmp_path / "absent"), "--eval", "none", *extra]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_one_block_values_are_the_exact_optimum_on_its_mask(layer, monkeypatch):
    """With a single block, the block's quadratic is H + λI itself: the polished values must be the
    masked optimum of that quadratic (a wrong Schur quadratic would give other values)."""
    import prac.methods.admm_blocks as blocks

    monkeypatch.setattr(blocks, "POLISH_ITERATIONS", 400)
    monkeypatch.setattr(blocks, "POLISH_TOL", 1e-13)
    x, w = layer
    xd, wd = x.double(), w.double()
    h = xd.T @ xd / x.shape[0]
    lam = 0.01 * float(h.diagonal().mean())
    a = h + lam * torch.eye(D_IN, dtype=h.dtype)
    swept, mask, _ = block_admm(wd, damped_upper(h, lam), torch.zeros(D_IN, dtype=torch.bool), Unstructured(0.5),
                                ADMMSettings(sweep="blocks", blocksize=D_IN))
    for i in range(D_OUT):
        free = ~mask[i]
        best = torch.linalg.solve(a[free][:, free], (wd[i] @ a)[free])
        assert torch.allclose(swept[i, free], best, rtol=1e-6, atol=1e-8)
