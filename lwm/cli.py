"""One line for a bad input, a traceback for a bug: what every entry point's main shares.

    if __name__ == "__main__":      # an absl entry point
        cli.run(main)               # instead of app.run(main); adds --verbose

    def main(argv=None):            # an argparse entry point
        parser = argparse.ArgumentParser(...)
        cli.add_verbose_argument(parser)
        args = parser.parse_args(argv)
        with cli.user_errors(args.verbose):
            ...

A missing file, a malformed line, a flag out of range (`USER_ERRORS`: ValueError, OSError,
and app.UsageError, for which absl would print the whole --help first) ends the program with
one line on stderr and exit status 1:

    eval_needle.py: --haystack_file: file not found: /data/pg19.jsonl

`--verbose` re-raises it with the full traceback instead. Any other exception is a bug and
keeps its traceback. In a multi-process run the line is followed by an immediate exit,
skipping jax.distributed's shutdown barrier, which would wait for peers that may be blocked
in a collective; they stop on the coordination service's heartbeat, as after a crash.

`check_input_files` and `check_output_file` let an entry point refuse a missing input or an
unwritable output before it builds anything, naming the flag:

    cli.check_input_files([("--haystack_file", path), ("--load_checkpoint", checkpoint)])
    cli.check_output_file("--output_file", output)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
from typing import Callable, Iterator

import absl.flags
from absl import app

# Subclasses included: lwm.data's DataError, lwm.vision_io's VisionReadError and
# lwm.vision_chat's PromptTooLongError are ValueErrors, as is a JSON or UTF-8 decode error;
# OSError covers a missing or unreadable file, a full disk and lwm.checkpoint's CheckpointWriteError.
USER_ERRORS: tuple[type[BaseException], ...] = (app.UsageError, ValueError, OSError)
VERBOSE_HELP = "on a bad input, show the full traceback instead of one line"

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help of an argparse entry point: the docstring's examples as written, every default shown
    (also for options without a help text, which argparse's own formatter leaves bare)."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and (action.required or action.default is not None):
            action = copy.copy(action)
            action.help = "required" if action.required else "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return action.help if "required" in action.help else f"{action.help} (required)"
        if "default" in (action.help or ""):  # the help text says it already, in words
            return action.help
        return super()._get_help_string(action)


# `--verbose` defined from here belongs to the entry point that calls `run` (its --help lists it).
absl.flags.disclaim_key_flags()


def program_name() -> str:
    """What the user typed: `lwm.train` for `python -m lwm.train`, `eval_needle.py` for a script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name not in ("__main__", ""):
        return spec.name
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "lwm"


def one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError from open() as `PATH: reason`."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _multi_process() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def _exit_now(status: int) -> None:
    """Leave without atexit handlers (jax.distributed's shutdown barrier among them)."""
    logging.shutdown()
    sys.stdout.flush()
    os._exit(status)


@contextlib.contextmanager
def user_errors(verbose: bool = False, program: str | None = None,
                expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn USER_ERRORS (and `expected`) raised inside into `program: message` and exit 1."""
    try:
        yield
    except USER_ERRORS + expected as error:
        if verbose:
            raise
        line = f"{program or program_name()}: {one_line(error)}"
        if _multi_process():
            print(line, file=sys.stderr, flush=True)
            _exit_now(1)
        raise SystemExit(line) from None  # Python prints it to stderr and exits with status 1


def add_verbose_argument(parser) -> None:
    """`--verbose` for an argparse entry point."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def define_verbose_flag() -> None:
    """`--verbose` for an absl entry point, listed in the calling module's --help. absl's own
    `--verbosity` (`-v`) sets the log level and is a different flag: absl matches whole names."""
    if "verbose" not in absl.flags.FLAGS:
        absl.flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    absl.flags.declare_key_flag("verbose")


def guarded(main: Callable, program: str | None = None, expected: tuple[type[BaseException], ...] = ()) -> Callable:
    """`main(argv)` with `user_errors` around it, reading --verbose from the parsed flags."""
    def run_main(argv):
        verbose = "verbose" in absl.flags.FLAGS and absl.flags.FLAGS.is_parsed() and absl.flags.FLAGS.verbose
        with user_errors(verbose, program, expected):
            return main(argv)
    return run_main


def run(main: Callable, program: str | None = None, expected: tuple[type[BaseException], ...] = ()) -> None:
    """`app.run(main)` with --verbose defined and bad inputs reported in one line."""
    define_verbose_flag()
    app.run(guarded(main, program, expected))


@contextlib.contextmanager
def naming(flag: str) -> Iterator[None]:
    """A bad value's ValueError raised inside gets the flag's name in front (`--dtype: ...`), so
    the one line says which flag to fix."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith(flag):
            raise
        raise app.UsageError(f"{flag}: {e}") from None


# ---- files, checked before anything is built ------------------------------------------------


def check_input_files(named) -> None:
    """Every (flag, path) pair names an existing file: a local one, or an object in a bucket
    (gs://..., s3://...: looked up with this machine's credentials, whose absence is one line)."""
    from lwm import storage

    for flag, path in named:
        if not path:
            continue
        if storage.is_remote(path):
            try:
                found = storage.isfile(path)
            except OSError as e:
                raise type(e)(f"{flag}: {e}") from None
            if not found:
                raise FileNotFoundError(f"{flag}: no such object: {path}")
        elif not os.path.isfile(path):
            reason = "is a folder, not a file" if os.path.isdir(path) else "file not found"
            raise FileNotFoundError(f"{flag}: {reason}: {path}")


def check_output_file(flag: str, path: str) -> None:
    """`path` can be written: not a folder, and its folder exists and is writable, or can be made
    (its nearest existing parent is a writable folder). Nothing is created. A bucket URL is
    checked when it is written (its credentials are the writer's)."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag}: {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{flag}: cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag}: cannot write {path}: folder {folder} is not writable")
