"""The ``ldt`` command line. Heavy imports (torch) happen inside commands so ``ldt --help`` is fast."""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import typer

from lowdose_toolkit import __version__

app = typer.Typer(
    name="ldt",
    help="lowdose-toolkit: recover standard-dose PET from low-dose PET (CG-3DSRGAN and baselines).\n\n"
    "Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowdose-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """lowdose-toolkit (ldt)."""


#: Every command: ``(name, "module:attribute")``; a typer app (``prepare``) becomes a command group. The
#: modules import torch and friends inside their functions, so ``ldt --help`` stays fast.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("plugins", "plugins:plugins"),
    ("check", "check:check_cmd"),
    ("run", "run:run_cmd"),
    ("infer", "infer:infer_cmd"),
    ("export", "export:export_cmd"),
    ("study", "study:study"),
    ("evaluate", "evaluate:evaluate"),
    ("table", "evaluate:table"),
    ("simulate", "simulate:simulate"),
    ("prepare", "prepare:prepare_app"),
    ("cache", "cache:cache_cmd"),
)


def register_commands() -> None:
    """Register :data:`COMMANDS` on :data:`app` (once)."""
    import importlib

    if app.registered_commands or app.registered_groups:
        return
    for name, target in COMMANDS:
        module, attribute = target.split(":")
        obj = getattr(importlib.import_module(f"lowdose_toolkit.cli.{module}"), attribute)
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


#: Set when SIGTERM arrived (it is raised as a KeyboardInterrupt, so it stops a command like Ctrl-C).
_terminated = False


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what schedulers and ``kill`` send) raises KeyboardInterrupt meanwhile: the command stops
    as on Ctrl-C (atomic writes leave complete files, a training run stays resumable)."""
    global _terminated
    _terminated = False

    def handler(signum: int, frame: FrameType | None) -> None:
        global _terminated
        _terminated = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one red line and exit 2; ``--debug`` shows tracebacks.

    Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), each with one line on what was kept.
    """
    from lowdose_toolkit.errors import UserError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LDT_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not debug:  # warnings as one line each, without the source line that raised them
        import warnings

        warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {message}\n"
    register_commands()
    try:
        with _sigterm_as_interrupt():
            app(args=args, prog_name="ldt")  # standalone: usage errors print their help and exit 2
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 130:  # typer turns Ctrl-C into exit 130 without a word
            return _interrupted(args)
        return code
    except UserError as exc:
        if debug:
            raise
        _error(str(exc))
        return 2
    except KeyboardInterrupt:  # outside typer's own handling (e.g. while it starts)
        return _interrupted(args)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if debug:
            raise
        if isinstance(exc, OSError) and exc.filename and exc.errno in _FILE_SYSTEM_FIXES:
            _error(f"{exc.filename}: {exc.strerror}; {_FILE_SYSTEM_FIXES[exc.errno]}")
            return 2
        _error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return 1
    return 0


# A file system that refuses a write is the user's to fix, not an internal error: one line naming the path.
_FILE_SYSTEM_FIXES = {
    errno.EACCES: "choose a folder you can write to, or change its permissions",
    errno.EPERM: "choose a folder you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.ENOSPC: "the disk is full; free space or choose a folder on another disk",
    getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is used up; free space or choose a folder on another disk",
    errno.EEXIST: "a file is in the way of a folder; move it or choose another path",
    errno.ENOTDIR: "a file is in the way of a folder; move it or choose another path",
}


def _interrupted(args: list[str]) -> int:
    """The one line for Ctrl-C (exit 130) or SIGTERM (exit 143), with how the command goes on."""
    what, code = ("terminated (SIGTERM)", 143) if _terminated else ("interrupted", 130)
    command = next((a for a in args if not a.startswith("-")), "")
    goes_on = "; `ldt run --resume RUN_DIR` continues the training" if command == "run" else ""
    _error(f"{what}; files already written are complete (atomic writes){goes_on}")
    return code


def _error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")


if __name__ == "__main__":
    sys.exit(main())
