"""What a job is asked to do: :class:`PruneJob` (``prac prune``) and :class:`EvalJob` (``prac eval``), the
frozen dataclasses the CLI fills. Their ``None`` fields are settled from the model by
:func:`prac.jobs.defaults.resolve`."""

from __future__ import annotations

from dataclasses import dataclass

from prac.engine.pipeline import PruneConfig
from prac.io import assets
from prac.jobs.allocation import AllocationConfig
from prac.model.shrink import Shape
from prac.parallel.harness import ZeroShotConfig


@dataclass(frozen=True)
class PruneJob:
    """A ``prac prune`` run. ``None`` fields are resolved from the model (see :func:`prac.jobs.defaults.resolve`)."""

    model: str = str(assets.DEFAULT_MODEL)
    calib: str | None = None  # c4 | wikitext2 | FILE.txt | FILE.jsonl; None: bundled text for the bundled model, else c4
    calib_tokens: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    prune: PruneConfig = PruneConfig()
    shape: Shape = Shape()  # structure: fewer MLP neurons / KV groups, before the pruning (prac.engine.structure)
    allocation: AllocationConfig = AllocationConfig()
    plot: str | None = None  # figure of the allocation plan
    # wikitext2 | c4 | FILE.txt | FILE.jsonl | "none", comma-separated; None: bundled text for the bundled model
    eval: str | None = None
    eval_seqlen: int | None = None
    eval_batch_size: int | None = None  # None: chosen for the device (prac.parallel.evaluate.default_eval_batch_size)
    dense_eval: bool = True
    cache: bool = True  # reuse/store the dense perplexity (prac.io.cache); False: always compute it
    tasks: ZeroShotConfig | None = None  # zero-shot tasks (lm-evaluation-harness) run on the pruned model
    save: str | None = None
    overwrite: bool = False
    save_format: str = "dense"  # dense | compressed (compressed-tensors' pack-quantized; needs prune.quant) | auto
    report: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    bos: str = "auto"  # auto | always | never: BOS at the start of every calibration/evaluation window (prac.io.data)
    # Filled by resolve() from the loaded model (recorded in the report, not settings):
    bos_resolved: str | None = None  # always | never (auto settled by the model type, or a saved folder's report)
    model_context: int | None = None  # max_position_embeddings or equivalent
    model_vocab_size: int | None = None  # rows of the input embedding
    defaults_from: str | None = None  # which rule gave the defaults (see prac.jobs.defaults.folder_defaults)


@dataclass(frozen=True)
class EvalJob:
    """A ``prac eval`` run: perplexity on one or more texts and/or zero-shot tasks; for an encoder, the
    cosine similarity of its last hidden states to a dense ``reference`` model's."""

    model: str = str(assets.DEFAULT_MODEL)
    data: str | None = None  # comma-separated sets as for --eval; None: as for prune (none when tasks are given)
    seqlen: int | None = None
    batch_size: int | None = None  # None: chosen for the device (prac.parallel.evaluate.default_eval_batch_size)
    device: str = "auto"
    dtype: str = "auto"
    report: str | None = None
    tasks: ZeroShotConfig | None = None
    overwrite: bool = False  # replace a --report file prac did not write
    reference: str | None = None  # encoders: the dense model compared with; None: the source a prac save names
    bos: str = "auto"  # auto | always | never, as for PruneJob
