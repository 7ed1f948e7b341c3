"""``cdi-matrix``: look at one deterministic weight matrix, and check what it claims.

Parse, prompt, call :func:`cdi_experiments.matrix.explore`, print, exit status; the matrix,
its statistics and the report's sections live in :mod:`cdi_experiments.matrix`. ``rows`` is
the fan_in and ``cols`` the fan_out. ``cdi-matrix --seed 42 --rows 10 --cols 20`` prints the
published matrix, whose row 0 begins ``0.960776   0.273809   0.253874   0.063188``.

Usage::

    cdi-matrix [--seed 42] [--rows 10] [--cols 20] [--mode he] [--layer-id 0]
               [--compare-modes] [--orthogonal] [--show-dist] [--test-repro]
               [--save FILE.npy] [--precision 6] [--max-rows 10] [--max-cols 8]

Without arguments on a terminal it asks for seed, rows, cols and mode. Exit status: 0 ok,
1 ``--test-repro`` found a difference or the file could not be written, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from cdi_experiments.cli.args import OneLineArgumentParser, print_error
from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.matrix import (
    MAX_ELEMENTS,
    MatrixView,
    explore,
    glyphs_for,
    save_npy_atomic,
)
from cdi_experiments.paths import DiskFullError

PROG = "cdi-matrix"
DEFAULTS = {"seed": 42, "rows": 10, "cols": 20, "mode": "he", "layer_id": 0}
MAX_PRECISION = 17  # digits after the point beyond which a float64 has nothing left to show

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """Bad input: becomes one ``cdi-matrix: error: ...`` line and exit status 2."""


class SaveError(Exception):
    """``--save`` could not write its file: one error line and exit status 1."""


# ----------------------------------------------------------------------------- input


def check_save_path(text: str) -> Path:
    """The ``--save`` target: a ``.npy`` name in an existing directory.

    Raises:
        CliError: another extension, a missing parent directory, or a directory as target.
    """
    path = Path(text).expanduser()
    if not path.name.endswith(".npy") or path.name == ".npy":
        raise CliError(
            f"--save needs a file name ending in .npy, got '{text}'; use e.g. --save matrix.npy"
        )
    parent = path.parent
    if not parent.is_dir():
        raise CliError(
            f"--save: directory '{parent}' does not exist; create it first (mkdir -p '{parent}') "
            "or save somewhere else"
        )
    if path.is_dir():
        raise CliError(f"--save: '{text}' is a directory; give a file name such as '{text}/m.npy'")
    return path


def _parse_u64(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"must be an integer in [0, 2**64), got '{text}'") from None
    if not 0 <= value <= B.MASK64:
        raise ValueError(f"must be in [0, 2**64), got {value}")
    return value


def _parse_positive(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"must be a positive integer, got '{text}'") from None
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _parse_precision(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PRECISION:
        raise ValueError(f"must be a number of digits from 0 to {MAX_PRECISION}, got '{text}'")
    return value


def _parse_mode(text: str) -> str:
    try:
        return schemes.get(str(text).strip()).name
    except ValueError:
        raise ValueError(
            f"unknown mode '{text}'; choose one of: {', '.join(schemes.names())} "
            "(aliases such as kaiming or glorot work too)"
        ) from None


def _argtype(parse: Callable[[str], Any], flag: str, example: str) -> Callable[[str], Any]:
    """An argparse ``type`` whose error message ends with how to fix it."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; use e.g. {flag} {example}") from None

    convert.__name__ = flag.lstrip("-")
    return convert


PROMPTS = (
    ("seed", "seed", _parse_u64),
    ("rows", "rows (fan_in)", _parse_positive),
    ("cols", "cols (fan_out)", _parse_positive),
    ("mode", "mode", _parse_mode),
)


def prompt_settings(
    input_fn: Callable[[str], str] = input,
    out: TextIO | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ask for seed, rows, cols and mode; Enter keeps the default in brackets.

    Args:
        input_fn: called with the prompt text, returns the answer (``input`` on a terminal).
        out: where the list of modes and the reasons for re-asking go (stdout by default).
        defaults: values used on an empty answer (:data:`DEFAULTS`).

    Returns:
        ``{"seed": int, "rows": int, "cols": int, "mode": str}``.

    Raises:
        CliError: the input ended (end of file) before every answer was given.
    """
    out = out or sys.stdout
    defaults = {**DEFAULTS, **(defaults or {})}
    print(f"Modes: {', '.join(schemes.names())}", file=out)
    answers: dict[str, Any] = {}
    for key, label, parse in PROMPTS:
        while True:
            try:
                text = input_fn(f"{label} [{defaults[key]}]: ").strip()
            except EOFError:
                raise CliError(
                    f"input ended at the '{key}' prompt; answer it, or pass flags instead "
                    f"(e.g. {PROG} --{key} {defaults[key]})"
                ) from None
            if not text:
                answers[key] = defaults[key]
                break
            try:
                answers[key] = parse(text)
                break
            except ValueError as exc:
                print(f"  {key} {exc}; try again (Enter keeps {defaults[key]})", file=out)
    return answers


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG,
        raise_as=CliError,
        help_hint=True,
        description=(
            "Print a deterministic weight matrix and statistics computed from it. "
            "rows is the fan_in and cols the fan_out (the original tool's convention)."
        ),
    )
    add = p.add_argument
    add("--seed", type=_argtype(_parse_u64, "--seed", "42"), default=DEFAULTS["seed"],
        help="generator seed in [0, 2**64) (default %(default)s)")  # fmt: skip
    add("--rows", type=_argtype(_parse_positive, "--rows", "10"), default=DEFAULTS["rows"],
        help="rows = fan_in (default %(default)s)")  # fmt: skip
    add("--cols", type=_argtype(_parse_positive, "--cols", "20"), default=DEFAULTS["cols"],
        help="cols = fan_out (default %(default)s)")  # fmt: skip
    add("--mode", type=_argtype(_parse_mode, "--mode", "he"), default=DEFAULTS["mode"],
        help=f"init scheme: {', '.join(schemes.names())} (default %(default)s)")  # fmt: skip
    add("--layer-id", type=_argtype(_parse_u64, "--layer-id", "0"), default=DEFAULTS["layer_id"],
        help="layer coordinate in [0, 2**64) (default %(default)s)")  # fmt: skip
    add("--compare-modes", action="store_true", help="table of every scheme on this shape")
    add("--orthogonal", action="store_true",
        help="orthogonal matrix (QR) at the mode's std; prints condition number and error")  # fmt: skip
    add("--show-dist", action="store_true", help="text histogram with expected counts")
    add("--test-repro", action="store_true",
        help="regenerate on every backend, require bit-identical values (exit 1 otherwise)")  # fmt: skip
    add("--save", metavar="FILE.npy", help="save the float64 matrix (atomic write)")
    add("--precision", type=_argtype(_parse_precision, "--precision", "6"), default=6,
        help="digits after the point (default %(default)s)")  # fmt: skip
    add("--max-rows", type=_argtype(_parse_positive, "--max-rows", "10"), default=10,
        help="rows shown in the preview (default %(default)s)")  # fmt: skip
    add("--max-cols", type=_argtype(_parse_positive, "--max-cols", "8"), default=8,
        help="columns shown in the preview (default %(default)s)")  # fmt: skip
    return p


def _check(args: argparse.Namespace) -> Path | None:
    """Cross-field checks, all before anything is generated or written."""
    if args.rows * args.cols > MAX_ELEMENTS:
        raise CliError(
            f"--rows x --cols = {args.rows * args.cols:,} values, more than the {MAX_ELEMENTS:,} "
            "this command generates (1 GiB of float64); use smaller --rows/--cols"
        )
    try:
        draw = schemes.resolve(args.mode, args.rows, args.cols)
    except ValueError as exc:
        raise CliError(
            f"mode '{args.mode}' needs scheme parameters, which {PROG} does not take "
            f"({str(exc).split(';')[0]}); choose another mode, e.g. zeros, ones or he"
        ) from None
    if args.orthogonal and draw.kind == "constant":
        raise CliError(
            f"--orthogonal needs a random mode and '{args.mode}' is constant; "
            "drop --orthogonal or use e.g. --mode he"
        )
    return check_save_path(args.save) if args.save is not None else None


# ----------------------------------------------------------------------------- entry point


def _run(args: argparse.Namespace, save_to: Path | None, out: TextIO) -> int:
    result = explore(MatrixView.from_namespace(args), glyphs_for(out))
    if save_to is not None:  # before printing, so a failed write shows no half-finished report
        try:
            save_npy_atomic(save_to, result.matrix)
        except DiskFullError as exc:  # already one line naming the file and the fix
            raise SaveError(str(exc)) from None
        except OSError as exc:
            raise SaveError(
                f"cannot write '{save_to}': {exc.strerror or exc}; "
                "check the directory's permissions and free space"
            ) from exc
    for k, lines in enumerate(result.sections):
        if k:
            print(file=out)
        print("\n".join(lines), file=out)
    if save_to is not None:
        print(f"\nSaved the float64 {result.matrix.shape} matrix to {save_to}", file=out)
    return EXIT_FAILED if result.bit_identical is False else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cdi-matrix``; returns the exit status (0 ok, 1 failed check, 2 usage).

    Args:
        argv: arguments without the program name; ``None`` means ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if not argv and sys.stdin is not None and sys.stdin.isatty():
            vars(args).update(prompt_settings(input, out))
            print(file=out)
        save_to = _check(args)
        return _run(args, save_to, out)
    except (CliError, ValueError) as exc:
        print_error(PROG, exc)
        return EXIT_USAGE
    except SaveError as exc:
        print_error(PROG, exc)
        return EXIT_FAILED
    except BrokenPipeError:  # `cdi-matrix | head` closed the pipe: stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
