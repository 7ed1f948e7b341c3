"""``cdi-matrix``: look at one deterministic weight matrix, and check what it claims.

The matrix has shape ``(rows, cols)`` and, as in the original tool's explorer, ``rows`` is the
fan_in and ``cols`` the fan_out. Element ``(i, j)`` of a normal scheme is::

    std(mode; fan_in=rows, fan_out=cols) * gaussian(seed; layer_id, i, j)

(:func:`cdi_experiments.generator.facade.published_check_matrix`); uniform schemes draw
``low + (high - low) * u01(seed; layer_id, i, j, 2)`` with bounds from the same fans. Every
statistic printed is computed from the generated values; the scheme's theoretical mean and
std stand beside them, checked against a sampling tolerance that shrinks with the number of
values. ``cdi-matrix --seed 42 --rows 10 --cols 20`` prints the published matrix, whose row 0
begins ``0.960776   0.273809   0.253874   0.063188``.

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
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from cdi_experiments.generator import bits as B
from cdi_experiments.generator import schemes
from cdi_experiments.generator.core import (
    TensorInit,
    generate,
    generate_tensor,
    resolve_backend,
)
from cdi_experiments.generator.facade import DeterministicNoiseGenerator
from cdi_experiments.paths import atomic_write

PROG = "cdi-matrix"
DEFAULTS = {"seed": 42, "rows": 10, "cols": 20, "mode": "he", "layer_id": 0}
MAX_ELEMENTS = 1 << 27
"""Largest matrix generated (1 GiB of float64): a clear error beats the OOM killer."""
MAX_PRECISION = 17  # digits after the point beyond which a float64 has nothing left to show
SE_BAND = 3.0  # a measured moment "matches" within this many standard errors
HIST_BINS, HIST_WIDTH = 20, 50

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """Bad input: becomes one ``cdi-matrix: error: ...`` line and exit status 2."""


class SaveError(Exception):
    """``--save`` could not write its file: one error line and exit status 1."""


# ----------------------------------------------------------------------------- the matrix


def generate_matrix(
    seed: int,
    rows: int,
    cols: int,
    mode: str = "he",
    layer_id: int = 0,
    *,
    orthogonal: bool = False,
    backend: str = "auto",
    device: str | None = None,
) -> np.ndarray:
    """The ``(rows, cols)`` float64 matrix this command shows (``rows`` is the fan_in).

    Args:
        seed, layer_id: generator coordinates, in [0, 2**64).
        rows, cols: shape; also fan_in and fan_out of the scheme.
        mode: scheme name or alias (:func:`cdi_experiments.generator.schemes.names`).
        orthogonal: QR of the same Gaussian, rescaled to the scheme's target std.
        backend: generator backend (``auto``, ``numba``, ``numpy``, ``torch``).
        device: a torch device to generate on (``cuda``); ``None`` is the CPU kernels.

    Raises:
        ValueError: bad coordinates, shape, mode, or ``orthogonal`` with a constant mode.

    Example:
        >>> round(float(generate_matrix(42, 10, 20)[0, 0]), 6)
        0.960776
    """
    gen = DeterministicNoiseGenerator(seed, backend=backend)
    draw = schemes.resolve(mode, rows, cols)
    orthogonal = orthogonal and draw.kind != "orthogonal"  # that scheme is orthogonal already
    if draw.kind == "normal":  # the published path: an explicit std with fan_in = rows
        if device is None:
            return gen.init_matrix(
                layer_id, (rows, cols), std=draw.std, orthogonal=orthogonal, dtype=np.float64
            )
        t = gen.init_tensor(
            layer_id,
            (rows, cols),
            std=draw.std,
            orthogonal=orthogonal,
            dtype=torch.float64,
            device=device,
        )
        return t.cpu().numpy()
    spec = TensorInit(
        gen.seed, layer_id, (rows, cols), mode, fan_in=rows, fan_out=cols, orthogonal=orthogonal
    )
    if device is None:
        return generate(spec, dtype=np.float64, backend=gen.backend)
    return generate_tensor(spec, dtype=torch.float64, device=device).cpu().numpy()


@dataclass(frozen=True)
class Target:
    """The distribution a scheme's values follow, and how far a sample may stray from it."""

    family: str  # "normal", "uniform" or "constant"
    mean: float
    std: float
    low: float = 0.0  # uniform bounds
    high: float = 0.0
    approximate: bool = False  # orthogonal matrices are only approximately normal

    @property
    def label(self) -> str:
        if self.family == "constant":
            return f"constant {self.mean:g}"
        if self.family == "uniform":
            return f"U({self.low:.6g}, {self.high:.6g})"
        approx = "~" if self.approximate else ""
        return f"{approx}N({self.mean:g}, {self.std:.6g}^2)"

    def cdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.family == "constant":
            return (x >= self.mean).astype(np.float64)
        if self.family == "uniform":
            return np.clip((x - self.low) / (self.high - self.low), 0.0, 1.0)
        z = (x - self.mean) / (self.std * math.sqrt(2.0))
        return 0.5 * (1.0 + np.vectorize(math.erf)(z))

    def within(self, k: float) -> float:
        """Probability of landing within ``k`` std of the mean."""
        if self.family == "constant":
            return 1.0
        if self.family == "uniform":
            return min(1.0, k / math.sqrt(3.0))
        return math.erf(k / math.sqrt(2.0))

    def mean_tolerance(self, n: int) -> float:
        return SE_BAND * self.std / math.sqrt(n)

    def std_tolerance(self, n: int) -> float:
        # SE of a sample std ~ std * sqrt((kurtosis - 1) / (4n)): kurtosis 3 normal, 9/5 uniform.
        kurtosis = 1.8 if self.family == "uniform" else 3.0
        return SE_BAND * self.std * math.sqrt((kurtosis - 1.0) / (4.0 * n))


def target_for(mode: str, rows: int, cols: int, *, orthogonal: bool = False) -> Target:
    """The theoretical distribution of ``generate_matrix(..., mode, orthogonal=...)``."""
    draw = schemes.resolve(mode, rows, cols)
    if draw.kind == "orthogonal":
        # A semi-orthogonal (r, c) matrix has element mean square 1 / max(r, c).
        return Target("normal", 0.0, abs(draw.gain) / math.sqrt(max(rows, cols)), approximate=True)
    mean, std = schemes.target_mean(draw), schemes.target_std(draw)
    if draw.kind == "constant":
        return Target("constant", mean, 0.0)
    if orthogonal:
        return Target("normal", 0.0, std, approximate=True)
    if draw.kind == "uniform":
        return Target("uniform", mean, std, low=draw.low, high=draw.high)
    return Target("normal", mean, std)


def matrix_stats(m: np.ndarray) -> dict[str, Any]:
    """Shape, moments, extremes and the fraction within 1/2/3 std (population std, ddof 0)."""
    mean, std = float(m.mean()), float(m.std())
    dev = np.abs(m - mean)
    return {
        "shape": tuple(m.shape),
        "n": int(m.size),
        "mean": mean,
        "std": std,
        "min": float(m.min()),
        "max": float(m.max()),
        "within": {k: float(np.mean(dev <= k * std)) for k in (1, 2, 3)},
    }


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Glyphs:
    ok: str
    warn: str
    pm: str
    mark: str
    blocks: str  # eighths of a cell, the last one full


UNICODE = Glyphs("✓", "⚠", "±", "│", "▏▎▍▌▋▊▉█")
ASCII = Glyphs("ok", "!!", "+/-", "|", "#")


def glyphs_for(stream: TextIO) -> Glyphs:
    """Unicode where the stream can encode it, ASCII otherwise (a C-locale pipe, cp1252)."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        (UNICODE.ok + UNICODE.warn + UNICODE.pm + UNICODE.mark + UNICODE.blocks).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


def _f(x: float, precision: int) -> str:
    return f"{x:.{precision}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Columns two spaces apart, each ``l``eft- or ``r``ight-aligned as ``align`` says."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return ("  " + "  ".join(parts)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def format_header(
    seed: int, rows: int, cols: int, mode: str, layer_id: int, orthogonal: bool, target: Target
) -> str:
    ortho = "  orthogonal" if orthogonal else ""
    return (
        f"{PROG}  seed={seed}  layer_id={layer_id}  mode={mode} {target.label}{ortho}  "
        f"shape=({rows}, {cols})  fan_in=rows={rows}  fan_out=cols={cols}  "
        f"generator v{B.GENERATOR_VERSION}"
    )


def format_preview(m: np.ndarray, precision: int, max_rows: int, max_cols: int) -> list[str]:
    """The top-left block of ``m``: row and column indices, ``%.{precision}f`` right-aligned."""
    r, c = m.shape
    block = m[:max_rows, :max_cols]
    cells = [[_f(v, precision) for v in row] for row in block.tolist()]
    width = max(len(str(block.shape[1] - 1)), *(len(s) for row in cells for s in row))
    iw = len(str(block.shape[0] - 1))
    more_cols = "  ..." if c > max_cols else ""
    caption = (
        f"Values: rows 0-{block.shape[0] - 1} of {r}, columns 0-{block.shape[1] - 1} of {c}"
        + ("" if (r, c) == block.shape else " (--max-rows/--max-cols show more)")
    )
    lines = [caption, " " * iw + "  " + "  ".join(f"{j:>{width}}" for j in range(block.shape[1]))]
    for i, row in enumerate(cells):
        lines.append(f"{i:>{iw}}  " + "  ".join(f"{s:>{width}}" for s in row) + more_cols)
    if r > max_rows:
        lines.append(" " * iw + "  ...")
    return lines


def format_stats(stats: dict[str, Any], target: Target, precision: int, g: Glyphs) -> list[str]:
    """Measured statistics beside the target, with a verdict on mean and std."""
    n = stats["n"]

    def verdict(measured: float, expected: float, tol: float) -> str:
        off = abs(measured - expected)
        if off <= tol + 1e-12 * max(1.0, abs(expected)):
            return f"{g.ok} within {g.pm}{tol:.{precision}f} ({SE_BAND:g} SE at n={n})"
        z = off / (tol / SE_BAND)
        chance = math.erfc(z / math.sqrt(2.0))  # two-sided, for an honest sample
        return (
            f"{g.warn} off by {z:.1f} SE (beyond {g.pm}{tol:.{precision}f}; "
            f"an honest sample lands this far {100 * chance:.2g}% of the time)"
        )

    rows = [
        ["shape", f"{stats['shape']}", "", f"{n} value{'s' if n != 1 else ''}"],
        [
            "mean",
            _f(stats["mean"], precision),
            _f(target.mean, precision),
            verdict(stats["mean"], target.mean, target.mean_tolerance(n)),
        ],
        [
            "std",
            _f(stats["std"], precision),
            _f(target.std, precision),
            verdict(stats["std"], target.std, target.std_tolerance(n)),
        ],
        ["min", _f(stats["min"], precision), "", ""],
        ["max", _f(stats["max"], precision), "", ""],
    ]
    for k, frac in stats["within"].items():
        rows.append(
            [f"within {g.pm}{k} std", f"{100 * frac:.2f}%", f"{100 * target.within(k):.2f}%", ""]
        )
    header = ["statistic", "measured", "target", ""]
    title = f"Statistics (computed from the values; target {target.label})"
    return [title, *_table(header, rows, "lrrl")]


def format_compare(
    seed: int, rows: int, cols: int, layer_id: int, precision: int, g: Glyphs
) -> list[str]:
    """Every scheme's plain draw on this shape: target std beside the measured moments."""
    body = []
    for name in schemes.names():
        try:
            target = target_for(name, rows, cols)
            m = generate_matrix(seed, rows, cols, name, layer_id)
        except ValueError as exc:  # e.g. 'constant' needs a value this command cannot take
            body.append([name, "-", "-", "-", "-", "-", "-", f"n/a: {exc}".split(";")[0]])
            continue
        s = matrix_stats(m)
        ok = abs(s["std"] - target.std) <= target.std_tolerance(s["n"]) + 1e-12
        body.append(
            [
                name,
                schemes.resolve(name, rows, cols).kind,
                _f(target.std, precision),
                _f(s["mean"], precision),
                _f(s["std"], precision),
                _f(s["min"], precision),
                _f(s["max"], precision),
                g.ok if ok else g.warn,
            ]
        )
    header = ["scheme", "kind", "target std", "mean", "std", "min", "max", "std ok"]
    title = f"Every scheme on shape ({rows}, {cols}), fan_in={rows}, fan_out={cols}, plain draws"
    return [title, *_table(header, body, "llrrrrrl")]


def format_orthogonal(
    m: np.ndarray, plain: np.ndarray, target: Target, precision: int
) -> list[str]:
    """Condition number and orthogonality error of ``m``, against the plain draw's."""
    r, c = m.shape
    gram, what = (m.T @ m, "W^T W") if r >= c else (m @ m.T, "W W^T")
    c2 = target.std**2 * max(r, c)  # W = gain * Q with gain^2 = std^2 * max(rows, cols)
    err = float(np.max(np.abs(gram - c2 * np.eye(gram.shape[0]))))
    sv = np.linalg.svd(m, compute_uv=False)  # descending
    cond, cond_plain = float(sv[0] / sv[-1]), float(np.linalg.cond(plain))  # = np.linalg.cond(m)
    return [
        "Orthogonality (QR of the same Gaussian, scaled so the element std hits the target)",
        f"  condition number      {_f(cond, precision)}   (plain draw: {_f(cond_plain, precision)})",
        f"  max |{what} - c^2 I|  {err:.3e}   (c^2 = {_f(c2, precision)})",
        f"  singular values       {_f(sv.min(), precision)} .. {_f(sv.max(), precision)}"
        f"   (c = {_f(math.sqrt(c2), precision)})",
    ]


def _bar(count: float, expected: float, scale: float, g: Glyphs) -> str:
    """``count`` as a bar of HIST_WIDTH cells at full ``scale``, ``expected`` as a mark."""
    eighths = round(count / scale * HIST_WIDTH * 8) if scale else 0
    if len(g.blocks) == 1:  # ASCII: whole cells only
        cells = list(g.blocks * round(eighths / 8))
    else:
        cells = list(g.blocks[-1] * (eighths // 8))
        if eighths % 8:
            cells.append(g.blocks[eighths % 8 - 1])
    cells += [" "] * (HIST_WIDTH + 1 - len(cells))
    at = min(HIST_WIDTH, round(expected / scale * HIST_WIDTH)) if scale else 0
    cells[at] = g.mark
    return "".join(cells).rstrip()


def format_histogram(m: np.ndarray, target: Target, precision: int, g: Glyphs) -> list[str]:
    """A text histogram over [min, max], with the count the target predicts per bin."""
    values = m.ravel()
    n = values.size
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:  # all values equal: one bin of zero width, expected only from a constant
        counts, edges = np.array([n]), np.array([lo, hi])
        expected = np.array([float(n) if target.family == "constant" else 0.0])
    else:
        counts, edges = np.histogram(values, bins=HIST_BINS, range=(lo, hi))
        expected = n * np.diff(target.cdf(edges))
    scale = float(max(counts.max(), expected.max()))
    labels = [_f(e, precision) for e in edges.tolist()]
    ew = max(len(e) for e in labels)
    rows = []
    for k, (count, exp) in enumerate(zip(counts.tolist(), expected.tolist(), strict=True)):
        close = "]" if k == len(counts) - 1 else ")"
        span = f"[{labels[k]:>{ew}}, {labels[k + 1]:>{ew}}{close}"
        rows.append([span, str(count), f"{exp:.1f}", _bar(count, exp, scale, g)])
    total = ["total", str(int(counts.sum())), f"{float(expected.sum()):.1f}", ""]
    title = (
        f"Distribution of the {n} values: {len(counts)} bin{'s' if len(counts) > 1 else ''}, "
        "bar = count, "
        f"{g.mark} = expected count under {target.label}"
    )
    return [title, *_table(["bin", "count", "expected", ""], [*rows, total], "lrrl")]


def reproducibility(
    m: np.ndarray, seed: int, rows: int, cols: int, mode: str, layer_id: int, orthogonal: bool
) -> list[tuple[str, float, bool]]:
    """Regenerate ``m`` on every path and compare: ``(label, max |diff|, bit-identical)``."""
    auto = resolve_backend("auto")
    paths: list[tuple[str, dict[str, Any]]] = [
        (f"run 2, backend auto ({auto})", {}),
        (f"run 3, backend auto ({auto})", {}),
        ("backend numpy", {"backend": "numpy"}),
        ("backend torch (cpu)", {"backend": "torch"}),
    ]
    if torch.cuda.is_available():
        paths.append(("backend torch (cuda)", {"device": "cuda"}))
    out = []
    for label, kwargs in paths:
        with warnings.catch_warnings():
            # core.generate_tensor hands torch a read-only numpy array (harmless, it only reads
            # it); keep torch's warning about that off the report.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            again = generate_matrix(
                seed, rows, cols, mode, layer_id, orthogonal=orthogonal, **kwargs
            )
        same = again.shape == m.shape and np.array_equal(again.view(np.uint64), m.view(np.uint64))
        diff = float(np.max(np.abs(again - m))) if again.shape == m.shape else math.inf
        out.append((label, diff, bool(same)))
    return out


def format_repro(results: list[tuple[str, float, bool]], g: Glyphs) -> list[str]:
    body = [
        [label, repr(diff), g.ok if same else g.warn + " differs"] for label, diff, same in results
    ]
    verdict = all(same for _, _, same in results)
    summary = (
        f"{g.ok} bit-identical on all {len(results) + 1} generations"
        if verdict
        else f"{g.warn} NOT bit-identical: the generator broke its contract; please report it"
    )
    title = "Reproducibility: the same matrix regenerated, compared with run 1 bit for bit"
    return [
        title,
        *_table(["generation", "max |diff|", "bit-identical"], body, "lrl"),
        "  " + summary,
    ]


# ----------------------------------------------------------------------------- saving


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


def save_npy_atomic(path: Path, m: np.ndarray) -> None:
    """``np.save`` through :func:`cdi_experiments.paths.atomic_write` (never a partial file)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, m)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


# ----------------------------------------------------------------------------- input


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


class _Parser(argparse.ArgumentParser):
    """argparse, with errors raised as :class:`CliError` (one line) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if ";" not in message:
            message += f"; see '{PROG} --help'"
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
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
    g = glyphs_for(out)
    p = args.precision
    coords = (args.seed, args.rows, args.cols, args.mode, args.layer_id)
    target = target_for(args.mode, args.rows, args.cols, orthogonal=args.orthogonal)
    m = generate_matrix(*coords, orthogonal=args.orthogonal)  # (rows, cols) = (fan_in, fan_out)

    sections = [
        [
            format_header(*coords, args.orthogonal, target),
            *format_preview(m, p, args.max_rows, args.max_cols),
        ],
        format_stats(matrix_stats(m), target, p, g),
    ]
    if args.orthogonal:
        plain_mode = (
            "custom" if schemes.resolve(args.mode, 1, 1).kind == "orthogonal" else args.mode
        )
        plain = generate_matrix(args.seed, args.rows, args.cols, plain_mode, args.layer_id)
        sections.append(format_orthogonal(m, plain, target, p))
    if args.show_dist:
        sections.append(format_histogram(m, target, p, g))
    if args.compare_modes:
        sections.append(format_compare(args.seed, args.rows, args.cols, args.layer_id, p, g))
    if save_to is not None:  # before printing, so a failed write shows no half-finished report
        try:
            save_npy_atomic(save_to, m)
        except OSError as exc:
            raise SaveError(
                f"cannot write '{save_to}': {exc.strerror or exc}; "
                "check the directory's permissions and free space"
            ) from exc
    status = EXIT_OK
    if args.test_repro:
        results = reproducibility(m, *coords, args.orthogonal)
        sections.append(format_repro(results, g))
        status = EXIT_OK if all(same for _, _, same in results) else EXIT_FAILED
    for k, lines in enumerate(sections):
        if k:
            print(file=out)
        print("\n".join(lines), file=out)
    if save_to is not None:
        print(f"\nSaved the float64 {m.shape} matrix to {save_to}", file=out)
    return status


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
        message = " ".join(str(exc).split())  # one line, whatever the text holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SaveError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
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
