"""The ``prac`` command: ``prune``, ``eval``, ``verify``, ``spectrum``.

This package is the only place that builds argument parsers: one module per command
(``prune.py``, ``eval.py``, ``verify.py``, ``spectrum.py``), each with ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> exit code``. The top-level parser knows only the
names and one-line help of the commands (:data:`COMMANDS`); a command's module is imported and its
arguments are added only when that command is parsed, so ``prac --help`` imports neither torch
nor transformers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`main` runs the command on every rank data-parallel
(``prune``, ``eval``, ``verify``; see :mod:`prac.parallel.session`), or on rank 0 alone while the others
wait (``spectrum``). Only rank 0 prints; an error is printed once, by the first rank that
failed, and every rank exits with its code.

Exit codes: 0 success, 1 a result that is not usable (a failed check, a non-finite
perplexity), 2 bad input (argument errors and :class:`prac.core.errors.PracError`, one line each),
130/143 interrupted/terminated.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from prac.cli.common import positive_int, sparsity
from prac.cli.prune import prune_job_from_args

__all__ = ["main", "build_parser", "positive_int", "sparsity", "prune_job_from_args", "COMMANDS"]

EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """A subcommand as the top-level parser sees it: where its code lives and its one-line help."""

    module: str
    help: str
    data_parallel: bool = False  # under torchrun: every rank works (else rank 0 alone)


def registry_names(module: str, name: str) -> tuple[str, ...]:
    """The string keys of the dict literal ``name`` in ``module``'s source, read without importing it
    (the method registry imports torch; ``prac --help`` must not). Empty when it is not a literal."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError, ValueError):
        return ()
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                       else None)
        if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Dict):
            return tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return ()


def _prune_help() -> str:
    methods = registry_names("prac.methods.registry", "METHODS")
    listed = f" ({', '.join(methods)})" if methods else ""
    return f"prune a model block by block{listed} with optional correction and quantization"


COMMANDS: dict[str, Command] = {
    "prune": Command("prac.cli.prune", _prune_help(), data_parallel=True),
    "eval": Command("prac.cli.eval", "perplexity of a causal LM on texts (an encoder: cosine to its dense model), "
                                     "zero-shot tasks", data_parallel=True),
    "verify": Command("prac.cli.verify", "check the statistics and correction invariants on a model",
                      data_parallel=True),
    "spectrum": Command("prac.cli.spectrum", "per-block Fisher eigenvalue spectra from per-sample gradients"),
}


class Parser(argparse.ArgumentParser):
    """An argument error is one line and a pointer to ``--help``, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


class CommandParser(Parser):
    """A subcommand's parser, filled from its module on first use (parse or help)."""

    def __init__(self, *args: Any, module: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._module = module
        self._built = False

    def build(self) -> CommandParser:
        if not self._built:
            self._built = True
            command = importlib.import_module(self._module)
            self.description = command.DESCRIPTION
            self.epilog = getattr(command, "EPILOG", None)
            self.formatter_class = argparse.RawDescriptionHelpFormatter
            command.add_arguments(self)
            self.set_defaults(func=command.run)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.build()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.build()
        return super().format_help()

    def format_usage(self) -> str:
        self.build()
        return super().format_usage()


def build_parser() -> Parser:
    """The ``prac`` parser; each command's arguments are added when that command is parsed."""
    from prac import __version__

    parser = Parser(prog="prac", description="Post-training pruning with reconstruction correction, "
                                             "and Fisher-spectrum analysis.")
    parser.add_argument("--version", action="version", version=f"prac {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, module=command.module)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(args: argparse.Namespace) -> None:
    """The ``prac`` logger: WARNING by default, INFO with ``-v``, DEBUG with ``--debug``.

    Only prac's own logger is set; transformers and the hub keep their own levels.
    """
    log = logging.getLogger("prac")
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``prac`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    if _world_size() > 1:
        return _main_rank(argv)
    args = _parsed(argv)
    if args is None:
        return EXIT_USAGE
    from prac.core.errors import PracError
    from prac.io.outputs import Terminated, install_signal_handlers

    install_signal_handlers()
    try:
        return args.func(args)
    except PracError as exc:
        if args.debug:
            raise
        print(f"prac {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: nothing was written", file=sys.stderr)
        return 143


def _parsed(argv: Sequence[str] | None) -> argparse.Namespace | None:
    """The parsed arguments with logging set up; None (after printing the help) when no command was given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return None
    configure_logging(args)
    return args


def _world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun), read without importing torch."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def _main_rank(argv: Sequence[str] | None) -> int:
    """:func:`main` for one rank of a ``torchrun`` launch; exits the process itself on failure.

    Ranks other than 0 print nothing; a failure is posted on the launcher's store
    (:class:`prac.parallel.failures.FailureBoard`) so every rank stops within a collective's poll, and only
    the first rank that failed prints its one line. A failed rank leaves with ``os._exit``: a process
    group with a collective still pending must not be torn down politely (it can wait forever)."""
    from prac.core.errors import PracError
    from prac.io.outputs import Terminated, install_signal_handlers
    from prac.parallel import session as distributed

    launch = distributed.launch_info()
    stderr = sys.stderr
    board = None
    args = argparse.Namespace(command=None, debug=False)
    with distributed.quiet_unless_main(launch):
        try:
            args = _parsed(argv)
            if args is None:
                return EXIT_USAGE
            install_signal_handlers()
            board = distributed.FailureBoard.connect(launch, distributed.timeout_s())
            session = distributed.init(launch, getattr(args, "device", "auto"), board)
            if COMMANDS[args.command].data_parallel:
                code = args.func(args)
            else:  # rank 0 runs it, the others wait for its exit code
                code = args.func(args) if launch.is_main else 0
                code = session.all_gather_objects(code, "exit code")[0]
            session.barrier("end of the command")
            distributed.shutdown()
            return code
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
            if isinstance(exc, distributed.PeerFailed):
                code, line = exc.code, None
            elif isinstance(exc, PracError):
                code, line = EXIT_USAGE, f"prac {args.command}: error: {exc}"
            elif isinstance(exc, KeyboardInterrupt):
                code, line = 130, "interrupted: nothing was written"
            elif isinstance(exc, Terminated):
                code, line = 143, "terminated: nothing was written"
            else:
                code, line = EXIT_FAILED, f"prac {args.command}: error: {type(exc).__name__}: {exc}"
            if line is not None and launch.distributed:
                line += f" (process {launch.rank} of {launch.world})"
            first = board.fail(code, line or "") if board is not None else True
            if first and line is not None:
                if args.debug:
                    traceback.print_exception(exc, file=stderr)
                print(line, file=stderr)
            for stream in (sys.stdout, stderr):
                stream.flush()
            os._exit(code)
