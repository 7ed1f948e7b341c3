"""One deterministic weight matrix, statistics computed from its values, and their report.

The logic behind ``cdi-matrix`` (:mod:`cdi_experiments.cli.matrix` parses and prints). The
matrix has shape ``(rows, cols)`` and, as in the original tool's explorer, ``rows`` is the
fan_in and ``cols`` the fan_out. Element ``(i, j)`` of a normal scheme is::

    std(mode; fan_in=rows, fan_out=cols) * gaussian(seed; layer_id, i, j)

(:func:`cdi_experiments.generator.facade.published_check_matrix`); uniform schemes draw
``low + (high - low) * u01(seed; layer_id, i, j, 2)`` with bounds from the same fans. Every
statistic is computed from the generated values; the scheme's theoretical mean and std stand
beside them, checked against a sampling tolerance that shrinks with the number of values.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
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
from cdi_experiments.tables import format_rows

MAX_ELEMENTS = 1 << 27
"""Largest matrix generated (1 GiB of float64): a clear error beats the OOM killer."""
SE_BAND = 3.0  # a measured moment "matches" within this many standard errors
HIST_BINS, HIST_WIDTH = 20, 50


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


def format_header(
    seed: int,
    rows: int,
    cols: int,
    mode: str,
    layer_id: int,
    orthogonal: bool,
    target: Target,
    title: str = "cdi-matrix",
) -> str:
    """The first line: coordinates, the target distribution and the generator version."""
    ortho = "  orthogonal" if orthogonal else ""
    return (
        f"{title}  seed={seed}  layer_id={layer_id}  mode={mode} {target.label}{ortho}  "
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
    return [title, *format_rows(header, rows, "lrrl", indent=2)]


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
    return [title, *format_rows(header, body, "llrrrrrl", indent=2)]


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
    return [title, *format_rows(["bin", "count", "expected", ""], [*rows, total], "lrrl", indent=2)]


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
        *format_rows(["generation", "max |diff|", "bit-identical"], body, "lrl", indent=2),
        "  " + summary,
    ]


# ----------------------------------------------------------------------------- saving


def save_npy_atomic(path: Path, m: np.ndarray) -> None:
    """``np.save`` through :func:`cdi_experiments.paths.atomic_write` (never a partial file)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, m)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class MatrixView:
    """Which matrix to generate and which sections of the report to add.

    Field names equal ``cdi-matrix``'s flags (``--layer-id`` is ``layer_id``).
    """

    seed: int = 42
    rows: int = 10
    cols: int = 20
    mode: str = "he"
    layer_id: int = 0
    orthogonal: bool = False
    show_dist: bool = False
    compare_modes: bool = False
    test_repro: bool = False
    precision: int = 6
    max_rows: int = 10
    max_cols: int = 8

    @classmethod
    def from_namespace(cls, ns: Any) -> MatrixView:
        """The view from an object with these attributes (e.g. an ``argparse.Namespace``)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Exploration:
    """The generated matrix and the report's sections, each a list of lines."""

    matrix: np.ndarray  # (rows, cols) float64
    sections: list[list[str]]
    bit_identical: bool | None  # every regeneration equal bit for bit; None without test_repro


def explore(view: MatrixView, g: Glyphs) -> Exploration:
    """Generate ``view``'s matrix and every section of its report.

    Raises:
        ValueError: bad coordinates, shape or mode (:func:`generate_matrix`).
    """
    p = view.precision
    coords = (view.seed, view.rows, view.cols, view.mode, view.layer_id)
    target = target_for(view.mode, view.rows, view.cols, orthogonal=view.orthogonal)
    m = generate_matrix(*coords, orthogonal=view.orthogonal)  # (rows, cols) = (fan_in, fan_out)

    sections = [
        [
            format_header(*coords, view.orthogonal, target),
            *format_preview(m, p, view.max_rows, view.max_cols),
        ],
        format_stats(matrix_stats(m), target, p, g),
    ]
    if view.orthogonal:
        plain_mode = (
            "custom" if schemes.resolve(view.mode, 1, 1).kind == "orthogonal" else view.mode
        )
        plain = generate_matrix(view.seed, view.rows, view.cols, plain_mode, view.layer_id)
        sections.append(format_orthogonal(m, plain, target, p))
    if view.show_dist:
        sections.append(format_histogram(m, target, p, g))
    if view.compare_modes:
        sections.append(format_compare(view.seed, view.rows, view.cols, view.layer_id, p, g))
    bit_identical = None
    if view.test_repro:
        results = reproducibility(m, *coords, view.orthogonal)
        sections.append(format_repro(results, g))
        bit_identical = all(same for _, _, same in results)
    return Exploration(m, sections, bit_identical)
