"""Everything prac writes: checked before any work, written atomically, never over what the user had.

Rules (each one a way a user's files were lost before):

- Every destination (``--save`` folder, ``--report`` file, spectrum outputs) is checked before the
  model is loaded: it may not lie inside the source model's folder, may not be an input of the
  run, must be creatable (nearest existing ancestor writable) and of the right kind.
- ``--overwrite`` replaces only a folder that prac wrote itself: one whose ``prac_report.json``
  lists every file in it (``saved_files``). A folder with anything else in it is refused, naming
  the foreign entries, and so is a folder that holds an input of the run.
- A single-file output (a report, a figure, a spectrum's JSON/CSV) that already exists is replaced
  only when prac wrote it (:func:`written_by_prac`: a prac report or spectrum by its content, a
  figure by the ``prac`` creator stamped into its metadata) or with ``--overwrite``. An empty path
  is an error, not "no output".
- Files are written to a temporary sibling and renamed into place; the temporary names carry the
  writer's pid so a later run removes what a killed run left behind. SIGTERM is turned into an
  exception (see :func:`install_signal_handlers`) so the same clean-up runs as for Ctrl-C, and the
  final renames of a run happen with both signals deferred, so either every output lands or none.
- Permissions follow the umask like any other tool (``mkstemp``/``mkdtemp`` would give 600/700).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prac.core.errors import PracError

REPORT_NAME = "prac_report.json"
_TMP_TAG = ".tmp-"


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally``/``except BaseException`` clean-ups run."""


def install_signal_handlers() -> None:
    """Turn SIGTERM into :class:`Terminated` (SIGINT already raises ``KeyboardInterrupt``)."""

    def handler(signum, _frame):
        raise Terminated(signum)

    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (the commit of a run's outputs is not interrupted)."""
    received: list[tuple[int, Any]] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, f: received.append((s, f)))
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for sig, frame in received:
            old = previous.get(sig)
            if callable(old):
                old(sig, frame)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_creatable(path: Path, what: str, display: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PracError(f"{what} {display!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PracError(f"{what} {display!r} cannot be written: no write permission in {str(parent)!r}")


@dataclass(frozen=True)
class Sources:
    """What a run reads: the model folder (when local) and input files. Outputs may touch none of them."""

    model: str | None = None
    files: tuple[str, ...] = ()

    def model_dir(self) -> Path | None:
        if self.model is None:
            return None
        p = Path(self.model).expanduser()
        return p.resolve() if p.exists() else None

    def input_files(self) -> list[Path]:
        return [_resolve(f) for f in self.files if f and Path(f).expanduser().exists()]


#: The creator stamped into every figure prac writes (``savefig(metadata=figure_metadata(fmt))``).
FIGURE_CREATOR = "prac"
_FIGURE_MARKS = {".png": b"tEXtSoftware\x00prac", ".pdf": b"/Creator (prac)", ".svg": b"<dc:title>prac</dc:title>"}


def figure_metadata(fmt: str) -> dict[str, str]:
    """The metadata that marks a figure as written by prac, for matplotlib's ``savefig``."""
    return {"Software": FIGURE_CREATOR} if fmt.lower() == "png" else {"Creator": FIGURE_CREATOR}


#: The header lines of the CSV files prac writes (each writer registers its own with :func:`csv_header`).
CSV_HEADERS: set[str] = set()


def csv_header(fields: tuple[str, ...]) -> tuple[str, ...]:
    """Register ``fields`` as a CSV header prac writes (so :func:`written_by_prac` knows its files); returns them."""
    CSV_HEADERS.add(",".join(fields))
    return fields


def written_by_prac(path: Path) -> bool:
    """Whether the existing file ``path`` is one prac wrote: a JSON report (``environment.prac``), a
    spectrum JSON (``metadata``/``blocks``) or CSV (prac's header), or a figure stamped by prac."""
    suffix = path.suffix.lower()
    try:
        if suffix in _FIGURE_MARKS:
            return _FIGURE_MARKS[suffix] in path.read_bytes()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if suffix == ".csv":
        return bool(text.splitlines()[:1]) and text.splitlines()[0] in CSV_HEADERS
    try:
        data = json.loads(text)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    env = data.get("environment")
    return (isinstance(env, dict) and "prac" in env) or ({"metadata", "blocks"} <= set(data) and "whole_model" in data)


def check_path_given(path: str | Path | None, what: str) -> None:
    """An output option given as an empty string is an error (it would otherwise write nothing, silently)."""
    if path is not None and not str(path).strip():
        raise PracError(f"{what}: the file name is empty")


def check_report_path(report: str | Path, sources: Sources, what: str = "report file", overwrite: bool = False) -> Path:
    """Refuse a report destination that is empty, a folder, an input, inside the model, not writable,
    or an existing file prac did not write (unless ``overwrite``)."""
    check_path_given(report, what)
    if str(report).endswith(("/", os.sep)):
        raise PracError(f"{what} {str(report)!r} ends with a slash: it names a folder; give a file name")
    path = _resolve(report)
    model_dir = sources.model_dir()
    if model_dir is not None and _inside(path, model_dir):
        raise PracError(f"{what} {str(report)!r} is inside the source model's folder {str(model_dir)!r}; "
                        "write it somewhere else")
    if path in sources.input_files():
        raise PracError(f"{what} {str(report)!r} is an input of this run; it would be overwritten")
    if path.is_dir():
        raise PracError(f"{what} {str(report)!r} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise PracError(f"{what} {str(report)!r} exists and is not writable")
    if path.exists() and not overwrite and not written_by_prac(path):
        raise PracError(f"{what} {str(report)!r} exists and was not written by prac; use --overwrite to replace it, "
                        f"or choose another name")
    _check_creatable(path, what, str(report))
    return path


def prac_written_files(folder: Path) -> set[str] | None:
    """The files prac's own report says it wrote into ``folder``; None when prac did not write it."""
    try:
        data = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("saved_files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files) | {REPORT_NAME}


def check_save_dir(out_dir: str | Path, sources: Sources, overwrite: bool) -> Path:
    """Refuse the source model's folder (or one inside/around it), folders holding inputs, and
    non-empty folders: with ``overwrite`` only a folder that holds nothing but a previous prac save."""
    check_path_given(out_dir, "output folder")
    out = _resolve(out_dir)
    shown = str(out_dir)
    model_dir = sources.model_dir()
    if model_dir is not None and (_inside(out, model_dir) or _inside(model_dir, out)):
        raise PracError(f"output folder {shown!r} would overwrite the source model at {str(model_dir)!r}")
    held = [p for p in sources.input_files() if _inside(p, out)]
    if held:
        raise PracError(f"output folder {shown!r} holds an input of this run ({held[0]}); choose another folder")
    if out.exists() and not out.is_dir():
        raise PracError(f"output path {shown!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PracError(f"output folder {shown!r} is not empty (use --overwrite to replace a previous prac save)")
        ours = prac_written_files(out)
        entries = (sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if ours is None
                   else _entries(out))  # a prac save may hold sub-folders (1_Pooling/): every file must be listed
        foreign = entries if ours is None else [e for e in entries if e not in ours]
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            why = "it was not written by prac" if ours is None else "prac did not write"
            raise PracError(f"--overwrite refuses {shown!r}: {why} {listed}; remove them or choose another folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PracError(f"output folder {shown!r} is not writable")
    _check_creatable(out, "output folder", shown)
    return out


def _entries(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, as ``saved_files`` lists them) and every
    empty sub-folder (with a trailing ``/``)."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            if not any(p.iterdir()):
                out.append(rel + "/")
        else:
            out.append(rel)
    return sorted(out)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{_TMP_TAG}{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries beside ``target`` left by prac processes that no longer run."""
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    stem = f".{target.name}{_TMP_TAG}"
    for entry in parent.iterdir():
        if not entry.name.startswith(stem):
            continue
        pid_text = entry.name[len(stem):].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jsonable(data: Any) -> Any:
    from prac.io.report import jsonable

    return jsonable(data)


def dump_json(data: Any) -> str:
    """The JSON text prac writes: NaN/Inf become null (strict JSON), one space indent."""
    return json.dumps(_jsonable(data), indent=1, allow_nan=False) + "\n"


def _makedirs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


class StagedFile:
    """A file written to a temporary sibling; :meth:`commit` renames it into place."""

    def __init__(self, path: str | Path, write: Callable[[Path], None]):
        self.path = Path(path).expanduser()
        _makedirs(self.path.parent)
        remove_stale_temporaries(self.path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=_tmp_prefix(self.path), suffix=".part")
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            write(self.tmp)
            os.chmod(self.tmp, file_mode())
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def stage_json(path: str | Path, data: Any) -> StagedFile:
    text = dump_json(data)
    return StagedFile(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    staged = stage_json(path, data)
    with deferred_signals():
        staged.commit()


class StagedDir:
    """A folder filled in a temporary sibling; :meth:`commit` swaps it into place.

    Replacing an existing folder (already checked by :func:`check_save_dir` to hold only a previous
    prac save) moves it aside, renames the new one in, keeps the old folder's mode, then deletes it.
    """

    def __init__(self, path: str | Path, fill: Callable[[Path], None]):
        self.path = _resolve(path)
        _makedirs(self.path.parent)
        remove_stale_temporaries(self.path)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=_tmp_prefix(self.path)))
        try:
            fill(self.tmp)
            mode = (self.path.stat().st_mode & 0o7777) if self.path.is_dir() else dir_mode()
            os.chmod(self.tmp, mode)
        except BaseException:
            self.discard()
            raise

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*") if p.is_file())

    def commit(self) -> None:
        if self.path.is_dir():
            old = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=_tmp_prefix(self.path) + "old-"))
            old.rmdir()
            self.path.rename(old)
            try:
                self.tmp.rename(self.path)
            except BaseException:
                old.rename(self.path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if self.path.exists():  # an empty leftover the checks allowed
                self.path.rmdir()
            self.tmp.rename(self.path)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def commit_all(staged: Iterable[StagedFile | StagedDir]) -> None:
    """Rename every staged output into place with signals deferred; discard all if one fails."""
    staged = list(staged)
    try:
        with deferred_signals():
            for s in staged:
                s.commit()
    except BaseException:
        for s in staged:
            s.discard()
        raise


@dataclass
class Outputs:
    """The staged outputs of one run, committed together at the end or discarded on any failure."""

    staged: list[StagedFile | StagedDir] = field(default_factory=list)

    def add(self, item: StagedFile | StagedDir) -> None:
        self.staged.append(item)

    def commit(self) -> None:
        commit_all(self.staged)
        self.staged = []

    def discard(self) -> None:
        for s in self.staged:
            s.discard()
        self.staged = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
