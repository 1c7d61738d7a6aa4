"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

Pruning papers (Wanda, SparseGPT, ADMM-pruning) report the mean zero-shot accuracy over seven tasks,
:data:`PAPER_TASKS`; ``--tasks paper7`` names that set. prac does not reimplement any task: it
wraps the model object it has (dense, or pruned a moment ago, never saved and reloaded) in the
harness's own ``HFLM`` and calls ``lm_eval.simple_evaluate``, so prompts, normalisation and metrics
are the harness's. What the papers disagree on is recorded rather than chosen: every task's ``acc``
*and* ``acc_norm`` (where the task has it) with their standard errors, the harness version and each
task's version, the few-shot count and how many documents were scored (``--limit``).

Local tasks: ``--include-path DIR`` holds harness YAMLs, e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}`` (paths relative to the working directory, as in the harness);
they run offline. When every requested task is found in the include path the harness's own task
index (thousands of YAMLs, ~40 s to scan on a busy CPU) is not built. A task whose data is on the
hub fails with one line when the hub cannot be reached (checked as for models: ``HF_HUB_OFFLINE``
or no answer within 3 s; the dataset loader is then put in offline mode so it does not retry).

Needs the optional extra: ``pip install 'prac[eval]'`` (lm-eval with its HF model support).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: The zero-shot set of Wanda / SparseGPT / ADMM: BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA.
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PRESETS: dict[str, tuple[str, ...]] = {"paper7": PAPER_TASKS}
#: Metrics kept per task (each with ``<metric>_stderr``): what multiple-choice tasks report.
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class ZeroShotConfig:
    """What to run: task names (presets expanded), the harness options passed on, local task YAMLs."""

    tasks: tuple[str, ...]
    presets: tuple[str, ...] = ()  # presets named on the command line (their mean is reported)
    num_fewshot: int | None = None
    limit: float | None = None  # documents per task (an int), or a fraction of them (< 1)
    batch_size: int | None = None  # None: as for perplexity on the device (see prac.parallel.evaluate)
    include_path: str | None = None


def parse_tasks(spec: str, num_fewshot: int | None = None, limit: float | None = None,
                batch_size: int | None = None, include_path: str | None = None) -> ZeroShotConfig:
    """``"paper7,my_task"`` -> a :class:`ZeroShotConfig` (presets expanded, order kept, repeats dropped).

    Checks what needs no harness: at least one name, ``--limit`` > 0, ``--num-fewshot`` >= 0 and an
    existing ``--include-path`` folder."""
    from prac.core.errors import PracError

    names: list[str] = []
    presets: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        expanded = PRESETS.get(part)
        if expanded is not None:
            presets.append(part)
        for name in expanded or (part,):
            if name not in names:
                names.append(name)
    if not names:
        raise PracError(f"--tasks {spec!r} names no task")
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise PracError(f"--limit must be > 0 (a document count, or a fraction below 1), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise PracError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if include_path is not None and not os.path.isdir(os.path.expanduser(include_path)):
        raise PracError(f"--include-path {include_path!r} is not a folder")
    if limit is not None and limit >= 1:
        limit = int(limit)
    return ZeroShotConfig(tuple(names), tuple(presets), num_fewshot, limit, batch_size,
                          os.path.expanduser(include_path) if include_path else None)


def harness_version() -> str | None:
    """The installed lm-eval version, or None when it is not installed (no import of the harness)."""
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def _import_harness():
    """``lm_eval``, with the dataset loader in offline mode when the hub cannot be reached."""
    from prac.core.errors import PracError
    from prac.model.loading import hub_offline_reason

    if harness_version() is None:
        raise PracError("--tasks needs lm-evaluation-harness: pip install 'prac[eval]'")
    if "datasets" not in sys.modules and hub_offline_reason() is not None:
        # datasets reads this once, at import: it then fails at once instead of retrying for ~25 s.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise PracError(f"lm-evaluation-harness is installed but cannot be imported: {exc}; "
                        f"pip install 'prac[eval]'") from exc
    return lm_eval, TaskManager


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness's own warnings (defaults it fills into task configs, a model passed as an object)
    hidden unless prac logs at INFO (``-v``/``--debug``): an error stays one line."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if not log.isEnabledFor(logging.INFO):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


@functools.lru_cache(maxsize=4)
def _disabled(cls: type) -> type:
    """``cls`` (a tqdm class) with every bar disabled."""

    class Disabled(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Disabled


@contextlib.contextmanager
def _bars(show: bool) -> Iterator[None]:
    """lm-eval's progress bars shown, or (``show`` False: ``--no-progress``) hidden for the call.

    The harness has no switch of its own: its modules call the ``tqdm`` class they imported (some
    import it inside a function), so for the call that name in each of its modules, and ``tqdm.tqdm``
    itself, are a subclass that is always disabled; both are restored after."""
    if show:
        yield
        return
    import tqdm
    import tqdm.auto

    originals = {tqdm.tqdm, tqdm.auto.tqdm}
    swapped = [(tqdm, "tqdm", tqdm.tqdm)]
    swapped += [(module, "tqdm", module.tqdm) for name, module in list(sys.modules.items())
                if name.split(".")[0] == "lm_eval" and getattr(module, "tqdm", None) in originals]
    for module, attr, cls in swapped:
        setattr(module, attr, _disabled(cls))
    try:
        yield
    finally:
        for module, attr, cls in swapped:
            setattr(module, attr, cls)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@dataclass
class PreparedTasks:
    """A task manager that knows every requested task, their data already loaded once (so a missing
    dataset fails before the model is loaded)."""

    config: ZeroShotConfig
    manager: Any  # lm_eval.tasks.TaskManager
    local_only: bool  # the harness's own task index was not needed


def _manager(config: ZeroShotConfig):
    from prac.core.errors import PracError

    _, TaskManager = _import_harness()
    if config.include_path:
        local = TaskManager(include_path=config.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in config.tasks):
            return local, True
    manager = TaskManager(include_path=config.include_path) if config.include_path else TaskManager()
    unknown = [name for name in config.tasks if name not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" or in {config.include_path}" if config.include_path else ""
        raise PracError(f"unknown zero-shot task {', '.join(hints)}: not in lm-eval {harness_version()}{where}; "
                        f"presets: {', '.join(PRESETS)}")
    return manager, False


@functools.lru_cache(maxsize=4)
def prepare(config: ZeroShotConfig) -> PreparedTasks:
    """Resolve and load every task of ``config`` (cached: a prune checks before loading the model and
    runs after pruning with the same manager). Bad names and unreachable data are one-line errors."""
    with _quiet_harness():
        manager, local_only = _manager(config)
        for name in config.tasks:
            _load_task(manager, name)
    return PreparedTasks(config, manager, local_only)


def _load_task(manager, name: str) -> None:
    """Build one task (its data read once), or a one-line :class:`PracError` saying why it cannot be."""
    from prac.core.errors import PracError
    from prac.model.loading import hub_offline_reason

    try:
        manager.load([name])
    except Exception as exc:  # noqa: BLE001 - the harness raises many kinds; each becomes one line
        reason = hub_offline_reason()
        offline = f"; the hub cannot be reached ({reason}): run it where the hub is reachable, or describe " \
                  f"a local copy in a YAML under --include-path" if reason else ""
        raise PracError(f"zero-shot task {name!r} could not load its data: {_first_line(exc)}{offline}") from exc


def _batch_size(config: ZeroShotConfig, model, device) -> int:
    if config.batch_size is not None:
        return config.batch_size
    from prac.model.loading import model_context
    from prac.parallel.evaluate import default_eval_batch_size

    context = model_context(model.config) or 2048
    return default_eval_batch_size(model, min(context, 2048), device)


def run_tasks(model, tokenizer, config: ZeroShotConfig, device, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (in memory) on ``config``'s tasks with the harness's ``HFLM``; the report's record.

    Returns ``harness`` (lm-eval version), ``tasks`` (per task: ``acc``, ``acc_stderr``, ``acc_norm``,
    ``acc_norm_stderr`` where present, ``version``, ``num_fewshot``, ``samples``), ``mean`` (per
    preset and over all tasks: the mean ``acc`` and, where every task has it, ``acc_norm``),
    ``batch_size``, ``limit``, ``seconds``. ``progress`` False hides the harness's bars (:func:`_bars`)."""
    from prac.parallel.evaluate import placed

    prepared = prepare(config)
    lm_eval, _ = _import_harness()
    from lm_eval.models.huggingface import HFLM

    batch = _batch_size(config, model, device)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    with placed(model, device), _quiet_harness(), _bars(progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot,
                                      limit=config.limit, task_manager=prepared.manager, log_samples=False)
    model.train(was_training)
    record = summarize(out, config)
    record.update(batch_size=batch, limit=config.limit, seconds=round(time.perf_counter() - started, 3))
    return record


def summarize(out: dict[str, Any], config: ZeroShotConfig) -> dict[str, Any]:
    """The report's zero-shot record from ``simple_evaluate``'s result (see :func:`run_tasks`)."""
    results = out.get("results", {})
    tasks: dict[str, dict[str, Any]] = {}
    for name in _leaf_tasks(out, config):
        row = results.get(name, {})
        entry: dict[str, Any] = {}
        for metric in METRICS:
            key = f"{metric},none"
            if key in row:
                entry[metric] = _number(row[key])
                entry[f"{metric}_stderr"] = _number(row.get(f"{metric}_stderr,none"))
        entry["version"] = out.get("versions", {}).get(name)
        entry["num_fewshot"] = out.get("n-shot", {}).get(name)
        samples = out.get("n-samples", {}).get(name)
        if isinstance(samples, dict):
            entry["samples"] = samples.get("effective")
            entry["documents"] = samples.get("original")
        tasks[name] = entry
    means: dict[str, dict[str, Any]] = {}
    for preset in config.presets:
        means[preset] = _mean({t: tasks[t] for t in PRESETS[preset] if t in tasks})
    if len(tasks) > 1:
        means["all"] = _mean(tasks)
    return {"harness": out.get("lm_eval_version") or harness_version(), "tasks": tasks, "mean": means}


def _leaf_tasks(out: dict[str, Any], config: ZeroShotConfig) -> list[str]:
    """Task names in the order asked, a group replaced by its subtasks."""
    subtasks = out.get("group_subtasks", {})
    names: list[str] = []

    def add(name: str) -> None:
        children = subtasks.get(name)
        if children:
            for child in children:
                add(child)
        elif name not in names and name in out.get("results", {}):
            names.append(name)

    for name in config.tasks:
        add(name)
    for name in out.get("results", {}):  # anything the harness ran that the walk missed
        if name not in names and name not in subtasks:
            names.append(name)
    return names


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _mean(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over tasks (as the papers average), of ``acc`` and, if every task has it, ``acc_norm``."""
    out: dict[str, Any] = {"tasks": len(tasks)}
    for metric in METRICS:
        values = [t.get(metric) for t in tasks.values()]
        if values and all(isinstance(v, float) for v in values):
            out[metric] = sum(values) / len(values)
    return out


def format_table(record: dict[str, Any]) -> str:
    """The small terminal table: one row per task (acc ± stderr, acc_norm ± stderr), then the means."""
    def cell(entry: dict[str, Any], metric: str) -> str:
        value = entry.get(metric)
        if value is None:
            return "-"
        err = entry.get(f"{metric}_stderr")
        return f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")

    rows = [("task", "acc", "acc_norm", "n")]
    for name, entry in record.get("tasks", {}).items():
        rows.append((name, cell(entry, "acc"), cell(entry, "acc_norm"), str(entry.get("samples", ""))))
    for name, entry in record.get("mean", {}).items():
        rows.append((f"mean {name}", cell(entry, "acc"), cell(entry, "acc_norm"), f"{entry.get('tasks')} tasks"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([f"zero-shot (lm-eval {record.get('harness')}):", *("  " + line for line in lines)])
