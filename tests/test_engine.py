"""The block engine: work done once per input group, a calibrate-only pass, and the statistics seam."""

import copy

import pytest
import torch

from prac.core.linalg import damped_cholesky, symmetric_inverse
from prac.correction import YARDSTICK_DAMPING, CorrectionConfig
from prac.correction.base import Holdout
from prac.engine.config import EngineConfig
from prac.engine.loop import calibrate
from prac.engine.pipeline import PruneConfig, prune_model
from prac.methods.patterns import NM, Unstructured
from prac.model.stats import StatsSpec

from .conftest import make_tiny_model, state_hash

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 4096, (6, 32), generator=torch.Generator().manual_seed(0))


def _qkv(outcome, block=0):
    groups = {r.group for r in outcome.layers}
    q = f"model.layers.{block}.self_attn.q_proj"
    assert q in groups and {r.name for r in outcome.layers if r.group == q} == {
        q, q.replace("q_proj", "k_proj"), q.replace("q_proj", "v_proj")}
    return q


@pytest.mark.parametrize("exact_errors,damping,expected", [
    (False, 1e-2, 1),  # the method's own (H + λI)⁻¹, shared by q, k and v
    (True, 1e-2, 2),  # ... and the yardstick's, at its own damping, shared too
    (True, YARDSTICK_DAMPING, 1),  # same damping: the yardstick reuses the method's
])
def test_optimal_factorises_once_per_input_group(calib, exact_errors, damping, expected):
    cfg = PruneConfig(correction=CorrectionConfig.of("optimal", exact_errors=exact_errors, holdout=Holdout(0.0),
                                                     damping=damping),
                      engine=EngineConfig(batch_size=3))
    outcome = prune_model(make_tiny_model("mistral"), calib, cfg, CPU)
    q = _qkv(outcome)
    assert outcome.factorisations[q] == expected
    assert set(outcome.factorisations.values()) == {expected}  # every group, however many linears share it


@pytest.mark.parametrize("refit", [True, False])
def test_held_out_acceptance_factorises_once_per_share(calib, refit):
    """With a held-out share: one factorisation of the fit share's H (the group's own) per damping
    tried in the group (its own, and the escalated ones if some linear needed them), shared by its
    linears; nothing is solved again on more tokens (``refit`` has no effect); no yardstick (exact
    errors off)."""
    cfg = PruneConfig(correction=CorrectionConfig.of("optimal", exact_errors=False, holdout=Holdout(0.34, refit=refit)),
                      engine=EngineConfig(batch_size=3))
    outcome = prune_model(make_tiny_model("mistral"), calib, cfg, CPU)
    for group, count in outcome.factorisations.items():
        diags = [r.correction for r in outcome.layers if r.group == group]
        tried = {k for d in diags for k in d.get("damping_heldout_errors", {repr(d["damping"]): 0})}
        accepted = {d["damping"] for d in diags if d["status"] == "accepted"}
        assert count == len(tried), group
        assert accepted <= {float(k) for k in tried}
    held = [r.correction["heldout_tokens"] for r in outcome.layers]
    assert set(held) == {2 * 32}  # round(0.34 * 6) = 2 of the 6 sequences, 32 tokens each


def test_sparsegpt_factorises_once_per_input_group(calib):
    outcome = prune_model(make_tiny_model("mistral"), calib, PruneConfig(method="sparsegpt", pattern=NM(2, 4)), CPU)
    assert outcome.factorisations[_qkv(outcome)] == 1
    assert set(outcome.factorisations.values()) == {1}
    mlp = [r for r in outcome.layers if r.group.endswith("gate_proj")]
    assert {r.name.rsplit(".", 1)[1] for r in mlp} == {"gate_proj", "up_proj"}


def test_damped_cholesky_retries_and_counts():
    h = torch.zeros(4, 4)
    h[0, 0] = 1.0  # singular: λ = 0 fails, any λ > 0 works
    tried = damped_cholesky(h, 0.0, 1.0, symmetric_inverse, retries=3)
    assert not tried.ok and tried.attempts == 1 and "Cholesky" in tried.reason  # nothing to grow
    grown = damped_cholesky(-torch.eye(4), 0.05, 1.0, symmetric_inverse, retries=3, growth=10.0)
    assert grown.ok and grown.attempts == 3 and grown.failures == 2 and grown.relative == pytest.approx(5.0)


def test_calibrate_only_pass_changes_nothing_and_sees_every_input(calib):
    model = make_tiny_model("mistral")
    before = state_hash(model)
    seen = {}

    def observe(group):
        seen[tuple(group.names)] = group.stats.l2.clone()

    calibrate(model, calib, StatsSpec(), observe, EngineConfig(batch_size=4))
    assert state_hash(model) == before
    names = [n for g in seen for n in g]
    assert len(names) == 2 * 7 and len(seen) == 2 * 4  # q/k/v, o, gate/up, down per block
    # Block 0 sees the embeddings in both passes: its statistics equal those a pruning run collects.
    pruned_seen = {}
    prune_model(copy.deepcopy(model), calib, PruneConfig(engine=EngineConfig(batch_size=3)), CPU,
                observer=lambda g: pruned_seen.setdefault(tuple(g.names), g.stats.l2.clone()))
    first = next(iter(seen))
    assert torch.allclose(seen[first], pruned_seen[first], rtol=1e-6)


def test_reduce_seam_sees_every_group_before_pruning(calib):
    """A reducer that doubles every statistic (two identical ranks summed) leaves Wanda's masks unchanged."""

    calls = []

    def double(group):
        st = group.stats
        calls.append(group.names[0])
        st.count *= 2
        st.sum.mul_(2)
        st.sumsq.mul_(2)

    reference = make_tiny_model("mistral")
    prune_model(reference, calib, PruneConfig(pattern=Unstructured(0.6)), CPU)
    model = make_tiny_model("mistral")
    outcome = prune_model(model, calib, PruneConfig(pattern=Unstructured(0.6)), CPU, reduce=double)
    assert len(calls) == len({r.group for r in outcome.layers})
    assert state_hash(model) == state_hash(reference)


def test_solver_fallbacks_warn_once_per_run(calib, caplog):
    import logging

    from prac.correction import summarize

    cfg = PruneConfig(pattern=Unstructured(0.7), correction=CorrectionConfig.of("optimal"))
    with caplog.at_level(logging.DEBUG, logger="prac"):
        outcome = prune_model(make_tiny_model("mistral"), torch.randint(0, 4096, (2, 16)), cfg, CPU)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("prac")]
    diags = [r.correction for r in outcome.layers]
    summary = summarize(diags)
    assert summary["solver_stalled_rows"] == sum(d["solver_stalled_rows"] for d in diags)
    if summary["layers_with_solver_fallback"]:
        assert len(warnings) == 1 and "layer(s) needed the Jacobi-PCG fallback" in warnings[0].getMessage()
    else:
        assert not warnings


def test_a_plan_sets_each_linears_sparsity(calib):
    plan = {"model.layers.0.mlp.down_proj": 0.25, "model.layers.1.self_attn.q_proj": 0.75}
    outcome = prune_model(make_tiny_model("mistral"), calib, PruneConfig(pattern=Unstructured(0.5), plan=plan), CPU)
    got = {r.name: r.sparsity for r in outcome.layers}
    assert got["model.layers.0.mlp.down_proj"] == pytest.approx(0.25, abs=1e-3)
    assert got["model.layers.1.self_attn.q_proj"] == pytest.approx(0.75, abs=1e-3)
    assert got["model.layers.0.self_attn.q_proj"] == pytest.approx(0.5, abs=1e-3)
    from prac.core.errors import PracError

    with pytest.raises(PracError, match="N:M"):
        PruneConfig(pattern=NM(2, 4), plan=plan)


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_calibrates_each_group_on_the_pruned_groups_before_it(calib, sequential):
    """A step that zeroes every linear it is given: with ``sequential`` the groups after q/k/v (o_proj
    reads softmax·V = 0) and after gate/up (down_proj reads act(gate)·up = 0) see zero inputs; without
    it every group is calibrated on the dense block. The first group of each block sees its dense input."""
    from prac.engine.loop import BlockEngine

    seen = {}

    def zero(group, linears):
        seen[group.names[0]] = float(group.stats.hessian.abs().max())
        return {n: torch.zeros_like(linears[n].weight, dtype=torch.float32) for n in group.names}

    model = make_tiny_model("mistral")
    engine = BlockEngine(EngineConfig(batch_size=4, sequential=sequential), CPU)
    engine.run(model, calib, StatsSpec(hessian=True), zero)
    for b in range(2):
        layer = f"model.layers.{b}"
        assert seen[f"{layer}.self_attn.q_proj"] > 0
        for name in (f"{layer}.self_attn.o_proj", f"{layer}.mlp.down_proj"):
            assert (seen[name] == 0) == sequential, (name, seen[name])
        assert seen[f"{layer}.mlp.gate_proj"] > 0  # the residual stream carries the block input past attention
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if n.endswith("proj.weight"))


def test_sequential_changes_the_masks_and_reruns_bit_identically(calib):
    def run(sequential):
        model = make_tiny_model("mistral")
        cfg = PruneConfig(method="sparsegpt", pattern=Unstructured(0.6),
                          engine=EngineConfig(batch_size=3, sequential=sequential))
        outcome = prune_model(model, calib, cfg, CPU)
        return state_hash(model), outcome

    (plain, _), (seq, outcome), (again, _) = run(False), run(True), run(True)
    assert seq == again and seq != plain
    assert all(r.sparsity == pytest.approx(0.6, abs=1e-3) for r in outcome.layers)
