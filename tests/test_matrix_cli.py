"""``cdi-matrix`` and :mod:`cdi_experiments.matrix`: the published matrix, statistics computed
from the values, every flag, and one-line errors. Tests call ``main`` in-process and parse
what it prints, as a user reads it.
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdi_experiments import matrix as mx
from cdi_experiments.cli import matrix as cli
from cdi_experiments.generator import schemes
from cdi_experiments.generator.facade import published_check_matrix

PUBLISHED_ROWS = (
    "0.960776   0.273809   0.253874   0.063188",
    "-0.280019  -0.300499  -0.373002  -0.000792",
    "-0.626875   0.343619  -0.583797   0.326972",
)
ERROR_PREFIX = "cdi-matrix: error: "


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def preview(out: str) -> list[list[str]]:
    """The preview's value cells, row by row, as printed (row index dropped)."""
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("Values:")) + 2
    rows = []
    for line in lines[start:]:
        tokens = line.split()
        if not tokens or not tokens[0].isdigit():
            break
        assert int(tokens[0]) == len(rows)
        rows.append([t for t in tokens[1:] if t != "..."])
    return rows


def stat(out: str, name: str) -> tuple[str, str]:
    """``(measured, target)`` as printed on the statistics line ``name``."""
    m = re.search(rf"^  {name}\s+(\S+)\s+(\S+)", out, flags=re.M)
    assert m, f"no '{name}' line in:\n{out}"
    return m.group(1), m.group(2)


# ----------------------------------------------------------------------------- the matrix


def test_published_rows(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--seed", "42", "--rows", "10", "--cols", "20")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("cdi-matrix  seed=42") and "shape=(10, 20)" in lines[0]
    assert lines[1].startswith("Values:")
    cells = preview(out)
    for row, published in zip(cells, PUBLISHED_ROWS, strict=False):
        assert row[:4] == published.split()
        assert published in out  # right-aligned columns, two spaces apart
    m = published_check_matrix(42, 10, 20, "he")
    assert len(cells) == 10 and all(len(r) == 8 for r in cells)  # default --max-cols 8
    assert cells == [[f"{v:.6f}" for v in row[:8]] for row in m.tolist()]


def test_preview_size_and_precision(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--max-rows", "3", "--max-cols", "20", "--precision", "3")
    m = published_check_matrix()
    assert rc == 0
    assert preview(out) == [[f"{v:.3f}" for v in row] for row in m[:3].tolist()]


def test_generate_matrix_uses_rows_as_fan_in() -> None:
    for mode in ("he", "xavier", "custom"):
        assert np.array_equal(
            mx.generate_matrix(7, 9, 4, mode), published_check_matrix(7, 9, 4, mode)
        )
    # uniform bounds from fan_in = rows: he_uniform is U(+-sqrt(6 / rows))
    m = mx.generate_matrix(7, 300, 2, "he_uniform")
    bound = math.sqrt(6 / 300)
    assert m.min() >= -bound and m.max() < bound and m.max() > 0.9 * bound


@pytest.mark.integration
def test_console_script_and_module(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("cdi-matrix")
    assert script.exists(), "console script missing: run `.venv/bin/pip install -e .`"
    done = subprocess.run(
        [str(script), "--seed", "42", "--rows", "10", "--cols", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for published in PUBLISHED_ROWS:
        assert published in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cdi_experiments.cli.matrix", "--rows", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith(ERROR_PREFIX) and len(bad.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    "argv",
    [
        ("--seed", "42"),
        ("--seed", "3", "--rows", "7", "--cols", "13", "--mode", "xavier_uniform"),
        ("--seed", "5", "--rows", "30", "--cols", "40", "--layer-id", "9", "--mode", "uniform"),
    ],
)
def test_statistics_are_computed_from_the_saved_matrix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: tuple[str, ...]
) -> None:
    path = tmp_path / "m.npy"
    rc, out, _ = run(capsys, *argv, "--save", str(path))
    assert rc == 0
    m = np.load(path)
    assert m.dtype == np.float64
    for name, value in (("mean", m.mean()), ("std", m.std()), ("min", m.min()), ("max", m.max())):
        assert stat(out, name)[0] == f"{value:.6f}", name
    dev = np.abs(m - m.mean())
    for k in (1, 2, 3):
        printed = re.search(rf"within ±{k} std\s+(\S+)%", out).group(1)
        assert printed == f"{100 * np.mean(dev <= k * m.std()):.2f}"
    shape = re.search(r"^  shape\s+\((\d+), (\d+)\)\s+(\d+) values", out, flags=re.M).groups()
    assert tuple(map(int, shape)) == (*m.shape, m.size)


@pytest.mark.parametrize("rows, cols", [(10, 20), (50, 5)])
def test_he_target_std_is_sqrt_2_over_rows(
    capsys: pytest.CaptureFixture[str], rows: int, cols: int
) -> None:
    _, out, _ = run(capsys, "--rows", str(rows), "--cols", str(cols))
    assert stat(out, "std")[1] == f"{math.sqrt(2 / rows):.6f}"
    assert stat(out, "mean")[1] == "0.000000"


def test_std_verdict_follows_the_sampling_tolerance() -> None:
    target = mx.target_for("he", 10, 20)
    n = 200
    tol = target.std_tolerance(n)
    assert tol == pytest.approx(3 * target.std / math.sqrt(2 * n))
    ok = {"shape": (10, 20), "n": n, "mean": 0.0, "std": target.std + 0.9 * tol, "min": -1.0}
    ok |= {"max": 1.0, "within": {1: 0.68, 2: 0.95, 3: 0.997}}
    bad = ok | {"std": target.std + 1.1 * tol}
    good_line = next(s for s in mx.format_stats(ok, target, 6, mx.UNICODE) if " std " in s)
    bad_line = next(s for s in mx.format_stats(bad, target, 6, mx.UNICODE) if " std " in s)
    assert "✓" in good_line and "⚠" not in good_line
    assert "⚠" in bad_line and "3.3 SE" in bad_line


# ----------------------------------------------------------------------------- flags


def test_compare_modes_lists_every_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--compare-modes")
    assert rc == 0
    table = out[out.index("Every scheme") :]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line.strip()}
    assert set(schemes.names()) <= set(rows)
    he = rows["he"]  # scheme kind target mean std min max ok
    m = published_check_matrix()
    assert he[2] == f"{math.sqrt(2 / 10):.6f}"
    assert he[3:7] == [f"{v:.6f}" for v in (m.mean(), m.std(), m.min(), m.max())]
    assert rows["xavier"][2] == f"{math.sqrt(2 / 30):.6f}"


def test_orthogonal_condition_number_is_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "q.npy"
    rc, out, _ = run(capsys, "--orthogonal", "--save", str(path))
    assert rc == 0
    cond, plain = re.search(r"condition number\s+(\S+)\s+\(plain draw: (\S+)\)", out).groups()
    assert float(cond) == pytest.approx(1.0, abs=1e-6)
    assert float(plain) > 1.5
    assert float(re.search(r"max \|W W\^T - c\^2 I\|\s+(\S+)", out).group(1)) < 1e-12
    w = np.load(path)  # (10, 20): rows orthogonal, element std = he's target sqrt(2 / 10)
    c2 = (2 / 10) * 20
    np.testing.assert_allclose(w @ w.T, c2 * np.eye(10), atol=1e-12)
    assert np.linalg.cond(w) == pytest.approx(1.0)
    assert stat(out, "std")[1] == f"{math.sqrt(2 / 10):.6f}"


def test_show_dist_counts_every_value(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--show-dist", "--rows", "12", "--cols", "25")
    assert rc == 0
    bins = re.findall(r"^  \[\s*(\S+),\s*(\S+)[)\]]\s+(\d+)\s+([\d.]+)", out, flags=re.M)
    assert len(bins) == 20
    counts = [int(b[2]) for b in bins]
    assert sum(counts) == 12 * 25
    m = published_check_matrix(42, 12, 25)
    assert counts == np.histogram(m, bins=20)[0].tolist()
    expected = sum(float(b[3]) for b in bins)
    assert 0.9 * 300 < expected <= 300.5  # normal density over [min, max]


def test_test_repro_reports_bit_identical(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--test-repro", "--mode", "he_uniform")
    assert rc == 0
    section = out[out.index("Reproducibility") :]
    diffs = re.findall(r"^  (run \d|backend \w+).*?\s(\S+)\s+✓$", section, flags=re.M)
    labels = [d[0] for d in diffs]
    assert {"run 2", "run 3", "backend numpy", "backend torch"} <= set(labels)
    assert all(d[1] == "0.0" for d in diffs)
    assert "bit-identical on all" in section


def test_test_repro_fails_when_a_backend_differs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = mx.generate_matrix

    def drifting(*args: object, **kwargs: object) -> np.ndarray:
        m = real(*args, **kwargs)
        if kwargs.get("backend") == "numpy":
            m = m.copy()
            m[3, 4] = np.nextafter(m[3, 4], np.inf)  # one ulp
        return m

    monkeypatch.setattr(mx, "generate_matrix", drifting)
    rc, out, _ = run(capsys, "--test-repro")
    assert rc == 1
    assert "NOT bit-identical" in out
    assert re.search(r"backend numpy\s+(\S+)", out).group(1) != "0.0"


# ----------------------------------------------------------------------------- --save


def test_save_writes_atomically_and_replaces(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "m.npy"
    path.write_bytes(b"old")
    rc, out, _ = run(capsys, "--save", str(path))
    assert rc == 0 and str(path) in out
    np.testing.assert_array_equal(np.load(path), published_check_matrix())
    assert os.listdir(tmp_path) == ["m.npy"]  # no temporary file left behind


def test_save_failure_leaves_the_old_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.npy"
    path.write_bytes(b"old")

    def disk_full(fh: object, arr: np.ndarray) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    rc, out, err = run(capsys, "--save", str(path))
    assert rc == 1 and out == ""
    assert err.startswith(ERROR_PREFIX) and "No space left" in err and len(err.splitlines()) == 1
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.npy"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("m.txt", "--save needs a file name ending in .npy"),
        ("m.npy.bak", "--save needs a file name ending in .npy"),
        ("missing/m.npy", "directory"),
        ("adir.npy", "is a directory"),
    ],
)
def test_save_refuses_bad_paths(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "adir.npy").mkdir()
    rc, out, err = run(capsys, "--save", str(tmp_path / name))
    assert (rc, out) == (2, "")
    assert err.startswith(ERROR_PREFIX) and message in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["adir.npy"]
    assert os.listdir(tmp_path / "adir.npy") == []


# ----------------------------------------------------------------------------- interactive


def fake_input(answers: list[str]):
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return answers.pop(0)

    return ask, prompts


def test_prompt_defaults() -> None:
    ask, prompts = fake_input(["", "", "", ""])
    out = io.StringIO()
    assert cli.prompt_settings(ask, out) == {"seed": 42, "rows": 10, "cols": 20, "mode": "he"}
    assert prompts == [
        "seed [42]: ",
        "rows (fan_in) [10]: ",
        "cols (fan_out) [20]: ",
        "mode [he]: ",
    ]
    assert "he_uniform" in out.getvalue()  # the modes are listed once


def test_prompt_reasks_with_the_reason() -> None:
    ask, prompts = fake_input(["abc", "-1", "7", "0", " 5 ", "", "nope", "Kaiming"])
    out = io.StringIO()
    got = cli.prompt_settings(ask, out)
    assert got == {"seed": 7, "rows": 5, "cols": 20, "mode": "he"}
    assert [p.split(" [")[0] for p in prompts] == ["seed"] * 3 + ["rows (fan_in)"] * 2 + [
        "cols (fan_out)",
        "mode",
        "mode",
    ]
    text = out.getvalue()
    assert "seed must be an integer in [0, 2**64), got 'abc'; try again" in text
    assert "seed must be in [0, 2**64), got -1" in text
    assert "rows must be a positive integer, got 0" in text
    assert "unknown mode 'nope'" in text


def test_no_flags_on_a_terminal_prompts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    ask, prompts = fake_input(["", "", "", ""])
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr("builtins.input", ask)
    rc, out, _ = run(capsys)
    assert rc == 0 and len(prompts) == 4
    assert PUBLISHED_ROWS[0] in out

    def eof(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    rc, out, err = run(capsys)
    assert rc == 2 and err.startswith(ERROR_PREFIX + "input ended") and len(err.splitlines()) == 1


def test_no_flags_without_a_terminal_uses_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a TTY; reading it would hang
    monkeypatch.setattr("builtins.input", lambda prompt: pytest.fail("prompted"))
    rc, out, _ = run(capsys)
    _, explicit, _ = run(capsys, "--seed", "42", "--rows", "10", "--cols", "20", "--mode", "he")
    assert rc == 0 and out == explicit


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rows", "0"], "argument --rows: must be a positive integer, got 0; use e.g. --rows 10"),
        (["--cols", "-3"], "argument --cols: must be a positive integer"),
        (["--rows", "ten"], "got 'ten'"),
        (["--seed", "-1"], "argument --seed: must be in [0, 2**64), got -1; use e.g. --seed 42"),
        (["--seed", str(2**64)], f"got {2**64}"),
        (["--layer-id", "-2"], "argument --layer-id: must be in [0, 2**64)"),
        (["--mode", "nope"], "unknown mode 'nope'; choose one of: zeros, ones"),
        (["--mode", "constant"], "mode 'constant' needs scheme parameters"),
        (["--mode", "zeros", "--orthogonal"], "--orthogonal needs a random mode"),
        (["--precision", "40"], "argument --precision: must be a number of digits from 0 to 17"),
        (["--max-cols", "0"], "argument --max-cols: must be a positive integer"),
        (["--rows", "100000", "--cols", "100000"], "use smaller --rows/--cols"),
        (["--bogus"], "unrecognized arguments: --bogus; see 'cdi-matrix --help'"),
        (["--rows"], "expected one argument"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    target = tmp_path / "m.npy"
    rc, out, err = run(capsys, "--save", str(target), *argv)
    assert (rc, out) == (2, "")
    assert err.startswith(ERROR_PREFIX) and err.endswith("\n")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err
    assert not target.exists()


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "fan_in" in out and "--compare-modes" in out


def test_ascii_terminal_gets_ascii_output(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    stream = io.TextIOWrapper(buf, encoding="ascii")  # strict: any non-ASCII raises
    assert mx.glyphs_for(stream) is mx.ASCII
    monkeypatch.setattr(sys, "stdout", stream)
    rc = cli.main(["--show-dist", "--test-repro", "--orthogonal", "--compare-modes"])
    stream.flush()
    text = buf.getvalue().decode("ascii")
    assert rc == 0 and "#" in text and "ok" in text
