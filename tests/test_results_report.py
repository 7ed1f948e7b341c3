"""``cdi-report`` on run folders written by hand: where it writes by default, which runs it
trusts (``status.json`` finished), how it names unreadable files, its lock and a full disk."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cdi_experiments import paths
from cdi_experiments.cli import report as report_cli
from cdi_experiments.run.status import write_status

METRICS = "epoch,train/acc,val/acc,test/acc,test/loss\n0,0.5,0.6,,\n1,0.7,0.8,,\n1,,,0.75,0.9\n"


def make_run(
    root: Path,
    name: str,
    *,
    state: str | None = "finished",
    metrics: str | bytes | None = METRICS,
    info: str | None = None,
) -> Path:
    """A run directory as cdi-train leaves it (without checkpoints and figures)."""
    run = root / name
    run.mkdir(parents=True)
    config = {
        "data": {"name": "mnist"},
        "model": {"name": "mlp"},
        "init": {"scheme": name},
        "seed": 0,
        "trainer": {"max_epochs": 2},
    }
    (run / "run_info.json").write_text(
        info if info is not None else json.dumps({"config": config, "model_name": "mlp"})
    )
    if isinstance(metrics, bytes):
        (run / "metrics.csv").write_bytes(metrics)
    elif metrics is not None:
        (run / "metrics.csv").write_text(metrics)
    if state is not None:
        write_status(run, state, "0" * 64, None if state == "finished" else "loss is nan")
    return run


def report(capsys, *argv) -> tuple[int, str, str]:
    code = report_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_output_is_beside_the_inputs_not_the_current_directory(
    tmp_path, capsys, monkeypatch
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    make_run(tmp_path / "sweep", "he")
    code, out, err = report(capsys, tmp_path / "sweep")
    assert code == 0, err
    report_dir = tmp_path / "sweep" / "report"
    assert f"1 runs -> {report_dir / 'runs.csv'}, {report_dir / 'runs.md'}" in out
    assert len(pd.read_csv(report_dir / "runs.csv")) == 1
    assert list(cwd.iterdir()) == []  # nothing in the current directory
    # a second report of the same folder does not count the first report as a run
    assert report(capsys, tmp_path / "sweep")[0] == 0
    assert len(pd.read_csv(report_dir / "runs.csv")) == 1


def test_unfinished_and_unreadable_runs_are_listed_by_file(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_run(root, "good")
    make_run(root, "badmetrics", metrics=b'epoch,test/acc\n0,"0.5\n\xff\xfe')
    make_run(root, "nometrics", metrics=None)
    make_run(root, "badinfo", info='{"config": {"seed"')
    make_run(root, "failed", state="failed")
    make_run(root, "nostatus", state=None)
    out_dir = tmp_path / "out"
    code, out, err = report(capsys, root, "--out", out_dir)
    assert code == 0, err

    table = pd.read_csv(out_dir / "runs.csv", keep_default_na=False).set_index("init")
    assert sorted(table.index) == ["badmetrics", "good", "nometrics"]
    assert table.loc["good", "problems"] == ""
    assert float(table.loc["good", "test/acc"]) == 0.75
    assert table.loc["badmetrics", "problems"].startswith("metrics.csv not a CSV table (")
    assert table.loc["nometrics", "problems"] == "metrics.csv missing"

    left = pd.read_csv(out_dir / "unreadable_runs.csv").set_index("run")
    assert dict(left["file"]) == {
        str(root / "badinfo"): str(root / "badinfo" / "run_info.json"),
        str(root / "failed"): str(root / "failed" / "status.json"),
        str(root / "nostatus"): str(root / "nostatus" / "status.json"),
    }
    assert left.loc[str(root / "badinfo"), "problem"].startswith("not JSON (")
    assert left.loc[str(root / "failed"), "problem"] == "failed: loss is nan"
    assert left.loc[str(root / "nostatus"), "problem"].startswith("missing: the run did not")
    assert "3 runs left out (unfinished or unreadable):" in out
    assert str(root / "badinfo" / "run_info.json") in out
    markdown = (out_dir / "runs.md").read_text()
    assert "## Runs left out (unfinished or unreadable)" in markdown
    assert str(root / "failed" / "status.json") in markdown


def test_no_finished_run_is_one_line_naming_a_file(tmp_path, capsys):
    make_run(tmp_path / "sweep", "failed", state="failed")
    code, out, err = report(capsys, tmp_path / "sweep")
    assert code == 2
    status = tmp_path / "sweep" / "failed" / "status.json"
    assert err == (
        f"cdi-report: error: no finished, readable runs under {tmp_path / 'sweep'}: 1 left out, "
        f"e.g. {tmp_path / 'sweep' / 'failed'} ({status}: failed: loss is nan)\n"
    )
    assert not (tmp_path / "sweep" / "report").exists()


def test_a_second_report_on_the_same_output_gets_one_line(tmp_path, capsys):
    make_run(tmp_path / "sweep", "he")
    out_dir = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from cdi_experiments.run.lock import run_lock\n"
            f"with run_lock({str(out_dir)!r}, 'cdi-report'):\n"
            "    print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = report(capsys, tmp_path / "sweep", "--out", out_dir)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert err.startswith(f"cdi-report: error: {out_dir} is in use by process {holder.pid} ")
    assert err.count("\n") == 1
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]


def test_full_disk_while_drawing_figures_is_one_line(tmp_path, capsys, monkeypatch):
    make_run(tmp_path / "sweep", "he")
    run = tmp_path / "sweep" / "he"
    (run / "prune_results.csv").write_text(
        "criterion,target,sparsity,acc_before,acc_after\n"
        "sleeping,matched@1e-05,0.1,0.75,0.7\nmagnitude,matched@1e-05,0.1,0.75,0.72\n"
    )
    real_savefig = Figure.savefig

    def full(self, fname, *args, **kwargs):
        real_savefig(self, fname, *args, **kwargs)  # a partial file is on disk...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...when the disk fills

    monkeypatch.setattr(Figure, "savefig", full)
    out_dir = tmp_path / "out"
    code, out, err = report(capsys, tmp_path / "sweep", "--out", out_dir)
    assert code == 2
    fs = paths.mount_point(out_dir)
    [line] = err.splitlines()
    assert line.startswith(f"cdi-report: error: cannot write {out_dir / 'figures'}/")
    assert line.endswith(f".png: no space left on {fs}; free space on {fs} and rerun cdi-report")
    assert not list(out_dir.rglob("*.png")) and not list(out_dir.rglob(".*.png.*"))
