"""The ``mass-dpo`` command: one subcommand per stage, each implemented by a module exposing
``add_arguments(parser)`` and ``run(args) -> int``.

    mass-dpo select ...      negatives for a dataset or your own file  (mass_dpo.preprocess)
    mass-dpo train ...       one training run and its metrics          (mass_dpo.train)
    mass-dpo reproduce ...   every notebook, headless                   (mass_dpo.reproduce)
    mass-dpo runs ...        carry finished runs between run caches     (mass_dpo.records)

Only the subcommand that runs is imported (``mass-dpo --help`` imports no torch). A user error (an unknown name, a
missing file, a bad value, a folder that cannot be written) prints one line naming the problem and the fix and exits
with status 2; so does any other failure (its type and first line); ``--debug`` shows the traceback instead.
Warnings print as one ``mass-dpo: warning: ...`` line each.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import warnings
from pathlib import Path

from . import __version__

SUBCOMMANDS = {
    "select": ("mass_dpo.preprocess", "select negatives for every prompt of a dataset split or of your own file"),
    "train": ("mass_dpo.train", "train one policy with one method and evaluate it"),
    "reproduce": ("mass_dpo.reproduce", "execute the paper's notebooks headless into papers_figures/"),
    "runs": ("mass_dpo.records", "export finished runs as records (no weights) or import records into the run cache"),
}

#: Exit status of a user error (argparse's own).
USAGE_STATUS = 2


class UsageError(Exception):
    """A mistake in what the user asked for (a bad option value, an unknown name, a missing file)."""


#: Exceptions reported as user errors (one line, status 2): their messages name the problem and the fix. File-system
#: errors (a full disk, a file-size limit, a folder that cannot be written) are reported the same way.
USER_ERRORS = (UsageError, ValueError, OSError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line, except flags, options whose default is None and help lines that
    already say their default (where it comes from: a params file, the model, ...)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in help_text:
            return help_text
        return help_text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: the problem, then where the options are described."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-5" for an option (its negative numbers are -1 and -.5): read it as a value, so that
        # `--lr -1e-5` says "must be > 0" rather than "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(\d+|\d*\.\d+|\d+\.?\d*[eE][-+]?\d+|\d*\.\d+[eE][-+]?\d+)$")

    def error(self, message):
        self.exit(USAGE_STATUS, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def finite_float(text: str, what: str = "") -> float:
    """argparse type: a finite number (``inf`` and ``nan`` are refused); ``what`` names the range in the messages."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number{what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number{what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (beta, gamma, learning rates); ``inf`` and ``nan`` are refused."""
    value = finite_float(text, " > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_at_least(low: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (n, steps)."""
    return _int_at_least(1, text)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a count where 0 means none)."""
    return _int_at_least(0, text)


def path_text(text: str) -> Path:
    """argparse type: a path that is not empty (``--out-dir=`` would otherwise mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder or file path")
    return Path(text).expanduser()


def check_model(name: str) -> None:
    """:func:`mass_dpo.params.check_model` as a :class:`UsageError` (one line, exit 2)."""
    from .params import check_model as check

    try:
        check(name)
    except ValueError as err:
        raise UsageError(str(err)) from None


def one_line(err: BaseException) -> str:
    """An exception's message on one line: its first line, the second (often the first bad row) and a count."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    out = lines[0] + (f" {lines[1]}" if len(lines) > 1 else "")
    if len(lines) > 2:
        more = len(lines) - 2
        out += f" (and {more} more line{'s' if more > 1 else ''}: --debug shows {'them' if more > 1 else 'it'})"
    return out


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    """The parser, with the arguments of only the subcommand ``argv`` names (imported here, lazily)."""
    parser = Parser(prog="mass-dpo", description="MASS-DPO: select informative negatives for preference data "
                    "and train on them (`mass-dpo COMMAND --help` for a command's options).")
    parser.add_argument("--version", action="version", version=f"mass-dpo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}",
                                parser_class=Parser)
    modules = {}
    wanted = _command(argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        if name == wanted:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(p)
    return parser, modules


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"mass-dpo: warning: {str(message).splitlines()[0] if str(message) else category.__name__}",
          file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    prog = f"mass-dpo {args.command}"
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _warn_one_line
        try:
            return int(modules[args.command].run(args) or 0)
        except USER_ERRORS as err:
            if debug:
                raise
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
            return USAGE_STATUS
        except Exception as err:  # anything else: still one line, the traceback with --debug
            if debug:
                raise
            print(f"{prog}: error: {type(err).__name__}: {one_line(err)} (--debug shows the traceback)",
                  file=sys.stderr)
            return USAGE_STATUS
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
