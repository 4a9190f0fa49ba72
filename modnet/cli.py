"""The ``modnet`` command. Every subcommand lives in its own module in ``modnet.commands``.

A command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Sequence

from . import __version__, commands
from .errors import ModnetError

RESUMABLE = ("train", "transfer", "adapt")  # commands whose interrupted runs resume


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away).

    Abbreviated options are not taken: an abbreviation binds silently to whichever
    option it prefixes today (``--data`` meant ``--data-root`` before ``--data``
    existed); a mistyped option gets the closest name instead (``_unrecognized``).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="modnet",
        description="Modular networks: train template pools and routes, transfer, adapt, bench.",
    )
    parser.add_argument("--version", action="version", version=f"modnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a subcommand.

    Problems with the user's input (``ModnetError``, argument errors), a full disk and
    a path the file system refuses (through a file, no permission, read-only) end as
    one line on stderr with exit code 2, Ctrl-C as one line with exit code 130;
    anything else is a bug or a failure of a library and keeps its traceback. Set
    ``MODNET_DEBUG=1`` to see the traceback of a user error too.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, which knows its options
        _unrecognized(parser, getattr(args, "command", None), extra)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a reader that left is found here, not at exit
            return code
    except BrokenPipeError:  # the reader left (``modnet routes RUN | head``): stop quietly
        _silence_stdout()
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through torch
        if os.environ.get("MODNET_DEBUG"):
            raise
        resumes = "; the run keeps its last checkpoint: the same command resumes it"
        hint = resumes if args.command in RESUMABLE else ""
        print(f"modnet {args.command}: interrupted{hint}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except (ModnetError, OSError) as error:
        if os.environ.get("MODNET_DEBUG") or not _is_user_error(error):
            raise
        print(f"modnet {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extra: list[str]):
    """Exits with the command's one-line error, suggesting the option a typo was near."""
    actions = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
    own = actions.get(command, parser)
    known = [o for o in own._option_string_actions if o.startswith("--")]
    hints = []
    for item in extra:
        if item.startswith("--"):
            name = item.split("=", 1)[0]
            if name in MODEL_OPTIONS and _reads_a_run(own):
                own.error(
                    f"{name} is an option of `modnet train`: `modnet {command}` takes the "
                    "model (family, depth, width, pool) from the run it is given"
                )
            # an abbreviation: the options it begins (argparse would have guessed)
            close = sorted(o for o in known if o.startswith(name))[:3]
            close = close or difflib.get_close_matches(name, known, n=1)
            hints += [(name, " or ".join(close))] if close else []
    words = [b if len(hints) == 1 else f"{b} for {a}" for a, b in hints]
    hint = f"; did you mean {', '.join(words)}?" if words else ""
    own.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


# What builds a model in ``modnet train``; every command given a run reads it from there.
MODEL_OPTIONS = ("--model", "--model-arg")


def _reads_a_run(parser: argparse.ArgumentParser) -> bool:
    return any(a.dest == "run_dir" for a in parser._positionals._group_actions)


def _silence_stdout() -> None:
    """Points stdout at the null device, so Python's flush at exit finds no closed pipe
    (the recipe of the ``signal`` module's docs for SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor: nothing to flush
        pass


def _is_user_error(error: BaseException) -> bool:
    from .io.fs import disk_full

    return isinstance(error, ModnetError) or disk_full(error) or _path_refused(error)


# What the file system says of a path it will not let this process use: a path
# through a file, a missing permission, a read-only file system. The commands check
# their output paths first (``check_writable``); this is the last resort.
PATH_ERRNOS = (errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS)


def _path_refused(error: BaseException) -> bool:
    return (
        isinstance(error, OSError)
        and error.errno in PATH_ERRNOS
        and bool(getattr(error, "filename", None))
    )


def _message(error: BaseException) -> str:
    if isinstance(error, ModnetError):
        return str(error)
    if _path_refused(error):
        return f"cannot use {error.filename} ({error.strerror}): check the path or choose another"
    where = f" while writing {error.filename}" if getattr(error, "filename", None) else ""
    return f"no space left on device{where}: free some space or write elsewhere"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"modnet: warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
