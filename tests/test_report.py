"""``cdi-report`` over real short runs, and the end-of-run console summary."""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import quick_cfg

from cdi_experiments import tables
from cdi_experiments.cli import report as report_cli
from cdi_experiments.run import report
from cdi_experiments.run import train as train_mod
from cdi_experiments.run.runs import load_runs

REPO = Path(__file__).resolve().parent.parent
CDI_REPORT = Path(sys.executable).parent / "cdi-report"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-epoch runs below one folder: init=zeros (a dead network) and init=he."""
    root = tmp_path_factory.mktemp("sweep")
    out = {}
    for init in ("zeros", "he"):
        cfg = quick_cfg(
            root / f"0_init={init}",
            f"init={init}",
            "trainer.max_epochs=2",
            "prune.sparsities=[0.5,0.8]",
        )
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            metrics, objects = train_mod.train(cfg)
        out[init] = SimpleNamespace(
            dir=Path(cfg.run_dir), metrics=metrics, objects=objects, stdout=stdout.getvalue()
        )
    return SimpleNamespace(root=root, by_init=out)


@pytest.fixture(scope="module")
def report_out(runs, tmp_path_factory):
    """``cdi-report <root> --out <dir>`` through the installed entry point."""
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run(
        [str(CDI_REPORT), str(runs.root), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(dir=out, stdout=proc.stdout)


def last_value(metrics: pd.DataFrame, key: str) -> float:
    return float(metrics[key].dropna().iloc[-1])


@pytest.mark.integration
def test_runs_table_has_one_row_per_run_equal_to_the_runs_files(runs, report_out):
    table = pd.read_csv(report_out.dir / "runs.csv")
    assert len(table) == 2
    assert sorted(table["init"]) == ["he", "zeros"]
    for _, row in table.iterrows():
        run = runs.by_init[row["init"]]
        assert Path(row["run"]) == run.dir
        metrics = pd.read_csv(run.dir / "metrics.csv")
        for key in ("test/acc", "val/acc", "train/acc"):
            assert row[key] == last_value(metrics, key), key
        layers = pd.read_csv(run.dir / "layer_changes.csv")
        final = layers[(layers["epoch"] == layers["epoch"].max()) & (layers["name"] == "all")]
        for t in ("0", "1e-05", "0.01"):
            assert row[f"awake_all@{t}"] == final[f"awake_pct@{t}"].iloc[0]
            assert row[f"awake_all@{t}"] == pytest.approx(
                last_value(metrics, f"awake/all@{t}"), rel=1e-12
            )
        prune = pd.read_csv(run.dir / "prune_results.csv").set_index(["criterion", "target"])
        assert (
            row["prune_sleeping_acc_after"] == prune.loc[("sleeping", "matched@1e-05"), "acc_after"]
        )
    by = table.set_index("init")
    # a zero-initialized ReLU net cannot break symmetry: only the last bias moves
    assert by.loc["zeros", "awake_all@0"] == pytest.approx(100 * 10 / 109386, rel=1e-12)
    assert by.loc["he", "awake_all@1e-05"] > 99
    assert by.loc["he", "test/acc"] > by.loc["zeros", "test/acc"]


@pytest.mark.integration
def test_runs_markdown_lists_every_run(report_out):
    md = (report_out.dir / "runs.md").read_text().splitlines()
    assert md[0].startswith("| label | data | model | optimizer | init | seed | epochs |")
    assert set(md[1].replace("|", "").split()) == {"---"}
    assert len(md) == 2 + 2
    assert any("| zeros |" in line for line in md[2:]) and any("| he |" in line for line in md[2:])
    assert "2 runs ->" in report_out.stdout


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    return struct.unpack(">II", data[16:24])


@pytest.mark.integration
def test_figures_are_valid_pngs_and_pdfs(report_out):
    figures = report_out.dir / "figures"
    names = sorted(str(p.relative_to(figures)) for p in figures.rglob("*.*"))
    stems = [
        "histograms/mnist_he",
        "histograms/mnist_zeros",
        "learning_curves",
        "mean_delta",
        "prune_accuracy",
        "sleeping_share",
    ]
    assert names == sorted(f"{s}.{ext}" for s in stems for ext in ("pdf", "png"))
    for stem in stems:
        width, height = png_size(figures / f"{stem}.png")
        assert width >= 600 and height >= 400, (stem, width, height)
        assert (figures / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    import matplotlib.image as mpimg

    pixels = mpimg.imread(figures / "prune_accuracy.png")
    assert pixels.std() > 0.05  # something was drawn


@pytest.mark.integration
def test_figures_of_real_runs_show_every_tensor_and_scheme(runs):
    from cdi_experiments.run import figures

    frames = load_runs([runs.root])
    tensors = set(pd.read_csv(runs.by_init["he"].dir / "layer_changes.csv")["name"])
    fig = figures.sleeping_share(frames.layers, panel="init")
    assert [ax.get_title() for ax in fig.axes] == ["init=he", "init=zeros"]
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
        assert {t.get_text() for t in ax.get_xticklabels()} == {"init", "0", "1"}
    he, zeros = fig.axes
    # He: every tensor moved a little, some entries stayed: every tensor has a line
    assert len(he.get_lines()) == len(tensors)
    # zeros: the whole network and every tensor but the last bias stay asleep (100 %)
    whole = next(ln for ln in zeros.get_lines() if ln.get_color() == "black")
    assert whole.get_ydata()[-1] == pytest.approx(100 - 100 * 10 / 109386, rel=1e-9)
    assert "not drawn: fc3.bias" in zeros.get_xlabel()  # it all moved: 0 % asleep
    fig = figures.learning_curves(frames.epochs)
    [ax] = fig.axes
    val = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]  # solid: val, per scheme
    assert len(val) == 2
    for line in val:  # the validation accuracy per epoch of one of the runs
        wanted = [
            [last_value(m[m["epoch"] == e], "val/acc") for e in (0, 1)]
            for m in (pd.read_csv(r.dir / "metrics.csv") for r in runs.by_init.values())
        ]
        assert any(list(line.get_ydata()) == pytest.approx(w) for w in wanted)
    assert len(ax.containers) == 2  # the test accuracy, measured once, per scheme
    fig = figures.prune_accuracy(frames.prune, panel="init")
    assert [ax.get_title() for ax in fig.axes] == ["one-shot\ninit=he", "one-shot\ninit=zeros"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.integration
def test_each_run_draws_its_own_figures(runs):
    for run in runs.by_init.values():
        names = sorted(p.name for p in (run.dir / "figures").glob("*.png"))
        assert names == [
            "awake_per_epoch.png",
            "delta_histograms.png",
            "learning_curves.png",
            "mean_delta_layers.png",
            "prune_accuracy.png",
        ]


@pytest.mark.integration
def test_end_of_run_summary_shows_train_val_and_test_accuracy(runs):
    for run in runs.by_init.values():
        summary = run.stdout[run.stdout.index("== run summary") :]
        metrics = pd.read_csv(run.dir / "metrics.csv")
        for key in ("train/acc", "val/acc", "test/acc"):
            assert f"{key} {last_value(metrics, key):.4f}" in summary, key
        assert "epochs 2" in summary
        assert "awakened share" in summary and "fc1.weight" in summary
        assert "sleeping weights (matched@1e-05)" in summary


@pytest.mark.integration
def test_summarize_run_fills_what_callback_metrics_lacks(runs):
    run = runs.by_init["he"]
    text = report.summarize_run(run.dir, {"test/acc": 0.5}, run.objects["callback"], None)
    assert "test/acc 0.5000" in text  # the given metrics win
    metrics = pd.read_csv(run.dir / "metrics.csv")
    assert f"val/acc {last_value(metrics, 'val/acc'):.4f}" in text
    assert "prune results" not in text


@pytest.mark.parametrize("case", ["missing", "empty", "file", "out_is_file", "bad_threshold"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    argv = {
        "missing": [str(tmp_path / "nope")],
        "empty": [str(empty)],
        "file": [str(afile)],
        "out_is_file": [str(empty), "--out", str(afile)],
        "bad_threshold": [str(empty), "--threshold", "-1"],
    }[case]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert report_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cdi-report: error: "), err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_broken_run_info_is_skipped_not_fatal(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run_info.json").write_text('{"config": {}}')
    out = tmp_path / "out"
    assert report_cli.main([str(runs.root), str(tmp_path), "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "runs.csv")) == 2


# ----------------------------------------------------------------------------- the table printer


def test_console_table_aligns_text_left_and_numbers_right():
    df = pd.DataFrame(
        {"name": ["fc1.weight", "all"], "numel": [100352, 7], "awake_pct@0": [99.5, float("nan")]}
    )
    lines = tables.format_frame(df, {"awake_pct@0": "{:.1f}".format}).splitlines()
    assert lines == [
        "name         numel  awake_pct@0",
        "fc1.weight  100352         99.5",
        "all              7          nan",
    ]
    md = tables.markdown_frame(df).splitlines()
    assert md == [
        "| name | numel | awake_pct@0 |",
        "| --- | --- | --- |",
        "| fc1.weight | 100352 | 99.5 |",
        "| all | 7 | nan |",
    ]


def test_console_table_refuses_ragged_rows():
    with pytest.raises(ValueError, match=r"row 1 has 1 cells, the header 2; give one per column"):
        tables.format_rows(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match=r"align 'lx' must hold one 'l' or 'r' per column"):
        tables.format_rows(["a", "b"], [], "lx")


@pytest.mark.integration
def test_a_tensorboard_only_run_has_its_metrics_and_weight_histograms(tmp_path):
    """No metrics.csv: train/val/test accuracy come from TensorBoard's event files, the weight
    histograms from the TensorBoard logger's ``weights/`` histograms. (cdi-train always writes
    metrics.csv now; a run from a project of one's own may not, so it is removed here.)"""
    cfg = quick_cfg(tmp_path / "tb", "logger=tensorboard", "trainer.max_epochs=2", "data.limit=300")
    with contextlib.redirect_stdout(io.StringIO()):
        metrics, _ = train_mod.train(cfg)
    run = Path(cfg.run_dir)
    csv_epochs = pd.read_csv(run / "metrics.csv")["val/acc"].dropna()
    assert len(csv_epochs) == 2  # written although only TensorBoard was asked for
    (run / "metrics.csv").unlink()
    frames = load_runs([tmp_path])
    assert "problems" not in frames.runs.columns
    ep = frames.epochs.set_index("epoch")
    assert list(ep.index) == [0, 1] and ep["val/acc"].notna().all()
    assert ep.loc[1, "test/acc"] == pytest.approx(metrics["test/acc"], rel=1e-6)
    row = frames.runs.iloc[0]
    assert row["val/acc"] == ep.loc[1, "val/acc"] and row["epochs"] == 2
    weights = frames.histograms[frames.histograms["kind"] == "weight"]
    numel = pd.read_csv(run / "layer_changes.csv").set_index(["epoch", "name"])["numel"]
    for (epoch, param), g in weights.groupby(["epoch", "param"]):
        assert g["count"].sum() == numel[(epoch, param)], (epoch, param)
    assert sorted(weights["epoch"].unique()) == [-1, 0, 1]
