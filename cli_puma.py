# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""What every PUMA command (`puma-train`/train.py, `puma-eval`/eval_puma.py, demo.py, space/app.py) does with a
mistake: one line on stderr and a non-zero exit status, no traceback.

    def cli(argv=None):
        run_command(main, argv)          # main raises UsageError (or the project's bad-input errors) on a mistake

A mistake is a `UsageError` (a command's own check of its arguments, paths and machine) or one of the errors the
project raises for bad input, each naming the input (`ValueError`, `OSError` such as `FileNotFoundError`, a missing
optional package's `ImportError`); anything else is a bug and keeps its traceback. `PUMA_DEBUG=1` shows the
traceback of mistakes too.
Argument-parser errors go the same way (`OneLineErrors`).

This module imports only the standard library: the commands use it before torch and transformers load.
"""

import argparse
import os
import sys


# Errors that report bad input (an option, a file's content), the machine (a missing path or package, an
# unreachable Hub), not a bug.
MISTAKES = (ValueError, OSError, ImportError)
USAGE_EXIT_STATUS = 2  # argparse's status for a wrong command line
ERROR_EXIT_STATUS = 1


class UsageError(Exception):
    """A mistake in a command's arguments, paths or machine, answered with its message on one line."""


def debugging() -> bool:
    """Whether `PUMA_DEBUG` asks for tracebacks of mistakes too."""
    return os.environ.get("PUMA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def command_name() -> str:
    """The name the user typed: `train.py`, `puma-eval`, ..."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "puma"


def invocation() -> str:
    """The command as the user typed it, for usage lines: `python train.py` for a script, `puma-eval` for a
    console command."""
    name = command_name()
    return f"python {name}" if name.endswith(".py") else name


def one_line(message: str) -> str:
    """`message` on one line: a line ending in ':' runs on into the next, other lines are joined by '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = ""
    for line in lines:
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text


def fail(message: str, status: int = ERROR_EXIT_STATUS, prog: str | None = None):
    """Prints `prog: error: message` on one line to stderr and exits with `status`."""
    print(f"{prog or command_name()}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_command(main, argv=None, prog: str | None = None):
    """Runs `main(argv)`; a `UsageError` or one of `MISTAKES` ends the process with one line on stderr (status 2
    for a `UsageError`, 1 otherwise), Ctrl-C with status 130. Returns what `main` returns."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog or command_name()}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except (UsageError, *MISTAKES) as err:
        if debugging():
            raise
        if isinstance(err, UsageError):
            fail(str(err) or type(err).__name__, USAGE_EXIT_STATUS, prog)
        # raised further down (a file's content, a library): the traceback may matter, so say how to see it
        fail(f"{one_line(str(err)) or type(err).__name__} (PUMA_DEBUG=1 shows where)", ERROR_EXIT_STATUS, prog)


class OneLineErrors:
    """Mixin for `argparse.ArgumentParser` subclasses: a wrong command line is answered with one line naming the
    problem and pointing at `--help` (argparse prints its whole usage first, dozens of lines for a big parser)."""

    def error(self, message):
        if debugging():
            raise UsageError(message)
        fail(f"{message} ({self.prog} --help lists the options)", USAGE_EXIT_STATUS, self.prog)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` answering a wrong command line with one line; its sub-command parsers too."""


def to_bool(value, option: str) -> bool:
    """A boolean option's value as the command line or a YAML file gives it (`true`, `false`, `1`, `no`, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1"):
        return True
    if text in ("false", "f", "no", "n", "0"):
        return False
    raise UsageError(f"--{option} {value}: not a boolean (use true or false)")


def to_int(value, option: str) -> int:
    """An integer option's value as the command line (a string) or a YAML file gives it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise UsageError(f"--{option} {value}: not an integer") from None


def require_path(path, option: str, kind: str = "any") -> str:
    """`path` (for `option`, e.g. `--mbeir-root`) when it exists as `kind` ('file', 'folder' or 'any'), else a
    `FileNotFoundError` naming the option and the absolute path looked for."""
    path = os.path.expanduser(os.fspath(path))
    exists = {"file": os.path.isfile, "folder": os.path.isdir, "any": os.path.exists}[kind](path)
    if not exists:
        what = {"file": "is not a file", "folder": "is not a folder", "any": "does not exist"}[kind]
        if kind != "any" and os.path.exists(path):
            what += f" (it is a {'folder' if os.path.isdir(path) else 'file'})"
        raise FileNotFoundError(f"{option} {path}: {os.path.abspath(path)} {what}")
    return path


def looks_like_path(name: str) -> bool:
    """Whether `name` reads as a local path rather than a Hub id (`org/name`): absolute, starting with `.` or `~`,
    ending with a separator, with more than one `/`, or whose first part is a local folder (`outputs/run1`)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def check_model_path(path: str, option: str = "--model") -> str:
    """`path`, a checkpoint folder or a Hub id for `option`: a file is a `ValueError`, a path that does not exist
    (`looks_like_path`) a `FileNotFoundError`."""
    if os.path.isfile(path):
        raise ValueError(f"{option} {path} is a file; pass a checkpoint folder or a Hub repository id")
    if not os.path.exists(os.path.expanduser(path)) and looks_like_path(path):
        raise FileNotFoundError(f"{option} {path}: {os.path.abspath(os.path.expanduser(path))} does not exist")
    return path


__all__ = ["ArgumentParser", "MISTAKES", "OneLineErrors", "UsageError", "check_model_path", "debugging", "fail",
           "invocation", "looks_like_path", "one_line", "require_path", "run_command", "to_bool",
           "to_int"]
