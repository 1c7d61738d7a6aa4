"""The checks a job runs before any heavy work, so that bad input is one line before the model loads:
the settings that need no model, the texts and token files named, what needs only the model's
meta-device skeleton, and every output destination."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from prac.core.errors import PracError
from prac.engine.pipeline import check_pattern, check_quant, sweep_blocksize
from prac.io.data import HUB_DATASETS, check_text_source, load_token_file, split_eval_sets
from prac.io.outputs import Sources, check_path_given, check_report_path, check_save_dir
from prac.jobs.config import PruneJob
from prac.jobs.defaults import check_bos_token, resolve, resolve_save_format
from prac.jobs.defaults import log as defaults_log
from prac.model.loading import check_tokenizer_source, model_skeleton
from prac.model.shrink import check_shrinkable, head_dim, text_config
from prac.model.units import model_units
from prac.quant.formats.compressed import check_compressed

log = logging.getLogger(__name__)


def check_prune_inputs(job: PruneJob) -> None:
    """Checks of a prune's settings that need no model, run before it is loaded: the ``--ignore`` regex,
    the ``--eval`` list, the calibration and evaluation texts given (:func:`check_sources`) and the
    zero-shot tasks (names known, data reachable; see :mod:`prac.parallel.harness`)."""
    check_ignore(job.prune.ignore)
    check_structure_settings(job)
    split_eval_sets(job.eval)
    check_sources(job.calib, job.calib_tokens, job.eval)
    if job.tasks is not None:
        from prac.parallel.harness import prepare

        prepare(job.tasks)


def check_structure_settings(job: PruneJob) -> None:
    """What the structured pass does not combine with yet, refused before the load."""
    if not job.shape.active:
        return
    if job.prune.engine.reconstruct.active and job.prune.engine.reconstruct.mode != "block":
        raise PracError("with --intermediate-size/--num-key-value-heads/--num-hidden-layers, --reconstruct "
                        "must be block for now (sublayer is not tried with them yet)")
    quant = job.prune.quant
    if quant.active and job.shape.intermediate_size is not None and quant.group_size > 0 \
            and job.shape.intermediate_size % quant.group_size:
        raise PracError(f"--groupsize {quant.group_size} does not divide --intermediate-size "
                        f"{job.shape.intermediate_size} (down_proj's inputs)")


def check_structure_grid(config, job: PruneJob) -> None:
    """With ``--wbits`` and groups, the inputs of ``o_proj`` that ``--num-key-value-heads`` leaves must
    split into whole groups (``--intermediate-size``'s are checked in :func:`check_structure_settings`)."""
    quant, kv = job.prune.quant, job.shape.num_key_value_heads
    if not (quant.active and quant.group_size > 0 and kv is not None):
        return
    cfg = text_config(config)
    width = kv * (int(cfg.num_attention_heads) // int(cfg.num_key_value_heads)) * head_dim(cfg)
    if width % quant.group_size:
        raise PracError(f"--groupsize {quant.group_size} does not divide the {width} inputs of o_proj that "
                        f"--num-key-value-heads {kv} leaves")


def check_sources(calib: str | None, calib_tokens: str | None, ev: str | None, note: str = "") -> None:
    """The calibration text (or token file) and the evaluation texts named, read before any model is:
    a missing, unreadable or binary file, a malformed token file or ``.jsonl``, or a hub text the hub
    cannot give is one line now rather than after the load (:func:`prac.io.data.check_text_source`)."""
    if calib_tokens:
        load_token_file(calib_tokens)
    elif calib:
        check_text_source(calib, "--calib" + note)
    for name in split_eval_sets(ev):
        check_text_source(name, "--eval" + note)


def check_without_weights(job: PruneJob) -> None:
    """What needs the model's shapes but not its weights, on its meta-device skeleton
    (:func:`prac.model.loading.model_skeleton`), before the load: the folder's tokenizer, the defaults and
    context lengths (:func:`prac.jobs.defaults.resolve`) and the texts the defaults name, the N:M pattern
    and the quantization grid against every layer's inputs, and ``--ignore`` leaving something to prune.
    Without a skeleton (a config transformers cannot build on ``meta``) they run after the load only."""
    skeleton = model_skeleton(job.model)
    if skeleton is None:
        check_bos_token(job.model, job.bos, job.bos if job.bos == "always" else None)
        return
    check_tokenizer_source(job.model)
    with muted(defaults_log):  # its warnings (a saved protocol's missing text) come once, from the resolve after the load
        early = resolve(job, skeleton)
    check_bos_token(job.model, job.bos, early.bos_resolved)
    check_sources(early.calib if job.calib is None and job.calib_tokens is None else None, None,
                  early.eval if job.eval is None else None, note=f" (default for {job.model})")
    check_model_fits(skeleton, job)


def check_model_fits(model, job: PruneJob) -> None:
    """The job's pattern, quantization grid, ``--ignore`` and save format against ``model``'s layers
    (its meta-device skeleton before the load, the loaded model after)."""
    check_shrinkable(model.config, job.shape)
    check_structure_grid(model.config, job)
    check_pattern(model, job.prune.pattern, job.prune.ignore)
    check_quant(model, job.prune.quant, job.prune.ignore, sweep_blocksize(job.prune))
    check_something_to_prune(model, job.prune.ignore)
    job = resolve_save_format(job, model)
    if job.save and job.save_format == "compressed":
        check_compressed(job.prune.quant, {n: u for _b, _i, units in model_units(model, job.prune.ignore)
                                           for n, u in units.items()})


@contextlib.contextmanager
def muted(logger: logging.Logger):
    """``logger``'s warnings dropped inside (errors still pass)."""
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def warn_if_evaluated_on_calibration(job: PruneJob) -> None:
    """A warning when an evaluation text is the calibration text (the same file, or a byte-identical
    copy): its numbers then measure the fit to the calibration windows, not quality on unseen text.
    (``c4`` and ``wikitext2`` calibrate on their train split and evaluate on another.)"""
    import filecmp

    if job.calib_tokens or not job.calib or job.calib in HUB_DATASETS:
        return
    for name in split_eval_sets(job.eval):
        try:
            same = name not in HUB_DATASETS and filecmp.cmp(Path(job.calib).expanduser(), Path(name).expanduser(),
                                                            shallow=False)
        except OSError:
            same = False
        if same:
            log.warning("the evaluation text %s is the calibration text %s: the result measures the fit to the "
                        "calibration windows, not quality on unseen text (give --eval another file)", name, job.calib)


def check_ignore(regex: str | None) -> None:
    """``--ignore`` must be a valid regular expression."""
    if regex is None:
        return
    try:
        re.compile(regex)
    except re.error as exc:
        raise PracError(f"--ignore {regex!r} is not a valid regular expression: {exc}") from exc


def check_something_to_prune(model, ignore: str | None) -> int:
    """The number of prunable layers left after ``ignore``; refuses a run that would prune none."""
    every: list[str] = [name for _b, _i, units in model_units(model) for name in units]
    kept = sum(len(units) for _b, _i, units in model_units(model, ignore))
    if kept == 0:
        example = f" (e.g. {every[0]})" if every else ""
        raise PracError(f"--ignore {ignore!r} matches all {len(every)} prunable layers{example}: nothing to prune")
    return kept


# --- outputs -------------------------------------------------------------------------------------

def prune_sources(job: PruneJob) -> Sources:
    """What a prune reads (the model and its text/token files): no output may overwrite them."""
    return Sources(model=job.model, files=tuple(f for f in (job.calib, job.calib_tokens, *split_eval_sets(job.eval)) if f))


def check_prune_outputs(job: PruneJob) -> None:
    """Every destination of a prune checked before the model is loaded (see :mod:`prac.io.outputs`)."""
    sources = prune_sources(job)
    for option, value in (("--save", job.save), ("--report", job.report), ("--plot", job.plot)):
        check_path_given(value, option)
    save = check_save_dir(job.save, sources, job.overwrite) if job.save else None
    if job.report:
        report = check_report_path(job.report, sources, overwrite=job.overwrite)
        if save is not None and (report == save or save in report.parents):
            raise PracError(f"report file {job.report!r} is inside the --save folder, which prac replaces whole; "
                            f"the folder gets its own prac_report.json")
    if job.plot:
        if not job.allocation.active:
            raise PracError("--plot draws the allocation plan: it needs --allocation owl or error")
        if Path(job.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise PracError(f"--plot {job.plot!r}: give a .png, .pdf or .svg file name")
        check_report_path(job.plot, sources, what="plot file", overwrite=job.overwrite)
