"""The report's figures: what each one draws (curves, bands, log axes, reference lines, labels),
checked on frames read from run folders in ``cdi-train``'s formats (``test_report_tidy``'s
``write_run``) and on a real signal-propagation measurement. The same figures of real trained
runs are checked in ``test_report.py`` (integration)."""

from __future__ import annotations

import statistics

import matplotlib
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import StepPatch
from test_report_tidy import (
    EPOCHS,
    PARAMS,
    THRESHOLDS,
    accuracy,
    awake,
    composed_config,
    write_run,
)

from cdi_experiments.modules.signal import signal_frame
from cdi_experiments.run import figures as F
from cdi_experiments.run.runs import Runs, load_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SEEDS = (0, 1, 2)
LRS = (0.001, 0.01)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Two learning rates x three seeds on MNIST, and one FashionMNIST run at lr 0.001."""
    root = tmp_path_factory.mktemp("fig")
    base_config = composed_config()
    for lr in LRS:
        for seed in SEEDS:
            write_run(root / f"lr={lr}", base_config, name=str(seed), lr=lr, seed=seed)
    write_run(root / "fashion", base_config, name="0", lr=0.001, seed=0, data="fashion_mnist")
    return load_runs([root])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def data_lines(ax) -> list:
    """The lines that show data: not the chance or unpruned reference lines, not the parts
    of an error bar."""
    parts = set()
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            line, caps, _ = c.lines
            parts.update([line, *caps])
    return [ln for ln in ax.get_lines() if ln.get_gid() is None and ln not in parts]


def bands(ax) -> list:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def assert_legend_outside(fig) -> None:
    assert len(fig.legends) == 1
    assert all(ax.get_legend() is None for ax in fig.axes)


def test_learning_curves_one_panel_per_dataset_one_line_per_scheme(runs):
    mnist = runs.epochs[runs.epochs["data"] == "mnist"]
    fig = F.learning_curves(runs.epochs, hue="optimizer.lr", panel="data")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["data=fashion_mnist", "data=mnist"]
    fashion, ax = axes
    assert len(data_lines(ax)) == len(LRS)  # validation, per learning rate
    assert len(bands(ax)) == len(LRS)  # three seeds each: mean +- std
    assert len(bands(fashion)) == 0  # one run: no band to draw
    # test accuracy was measured once: a mean +- std marker per learning rate
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == len(LRS)
    for line in data_lines(ax):
        ys = list(line.get_ydata())
        lr = next(lr for lr in LRS if ys[0] == pytest.approx(accuracy_mean(lr, 0)))
        assert ys == pytest.approx([accuracy_mean(lr, e) for e in range(EPOCHS)])
    assert [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_gid() == "chance"] == [0.1]
    assert ax.get_xlabel() == "epoch" and "accuracy (fraction correct)" in ax.get_ylabel()
    assert fig.get_suptitle().startswith("Learning curves per optimizer.lr")
    assert_legend_outside(fig)
    assert len(mnist["run"].unique()) == 6


def accuracy_mean(lr: float, epoch: int) -> float:
    return statistics.mean(accuracy(lr, s, epoch) for s in SEEDS)


def per_epoch_test_accuracy(lr: float, seed: int, epoch: int) -> float:
    """What the MNIST runs below measured on the test set at each epoch (data.test_each_epoch)."""
    return accuracy(lr, seed, epoch) - 0.05 - 0.002 * seed


def test_learning_curves_draw_test_per_epoch_dashed_and_fall_back_to_a_marker(runs):
    epochs = runs.epochs.copy()
    mnist = epochs["data"] == "mnist"
    epochs["test_epoch/acc"] = [
        per_epoch_test_accuracy(lr, seed, e) if is_mnist else float("nan")
        for lr, seed, e, is_mnist in zip(
            epochs["optimizer.lr"], epochs["seed"], epochs["epoch"], mnist, strict=True
        )
    ]
    fig = F.learning_curves(epochs, hue="optimizer.lr", panel="data")
    fashion, ax = [a for a in fig.axes if a.get_visible()]
    # MNIST (every run measured the test set per epoch): per lr a solid validation line and a
    # dashed test line in its colour, each with a band over the 3 seeds; no after-training marker
    lines = data_lines(ax)
    assert sorted(ln.get_linestyle() for ln in lines) == ["-", "-", "--", "--"]
    assert len(bands(ax)) == 2 * len(LRS)
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    for dashed in (ln for ln in lines if ln.get_linestyle() == "--"):
        ys = list(dashed.get_ydata())
        lr = next(lr for lr in LRS if ys[0] == pytest.approx(accuracy_mean(lr, 0) - 0.052))
        assert list(dashed.get_xdata()) == list(range(EPOCHS))
        expected = [
            statistics.mean(per_epoch_test_accuracy(lr, s, e) for s in SEEDS) for e in (0, 1)
        ]
        assert ys == pytest.approx(expected)
        solid = [
            ln for ln in lines if ln.get_linestyle() == "-" and ln.get_color() == dashed.get_color()
        ]
        assert len(solid) == 1  # the same scheme's validation line
        assert solid[0].get_marker() == dashed.get_marker()  # the scheme's marker
        assert solid[0].get_ydata()[0] == pytest.approx(accuracy_mean(lr, 0))
    assert len({ln.get_marker() for ln in lines}) == len(LRS)  # overlapping schemes stay visible
    # FashionMNIST (no test_epoch): today's figure, validation line and a test marker
    assert [ln.get_linestyle() for ln in data_lines(fashion)] == ["-"]
    (marker,) = [c for c in fashion.containers if isinstance(c, ErrorbarContainer)]
    assert marker.lines[0].get_marker() == "*"
    assert marker.lines[0].get_ydata()[0] == pytest.approx(accuracy(0.001, 0, EPOCHS))
    assert_legend_outside(fig)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[-4:] == [
        "validation",
        "test (per epoch)",
        "test (after training)",
        "chance (0.1)",
    ]
    legend = fig.legends[0]
    styles = {
        t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
    }
    assert styles["test (per epoch)"].get_linestyle() == "--"
    assert styles["validation"].get_linestyle() == "-"


def test_sleeping_share_is_log_scale_per_tensor_from_init(runs):
    mnist = runs.layers[runs.layers["data"] == "mnist"]
    fig = F.sleeping_share(mnist, threshold=1.2e-5, panel="optimizer.lr")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(LRS)
    assert "|w - w0| <= 1e-05" in fig.get_suptitle()  # the nearest tracked threshold
    for ax in axes:
        assert ax.get_yscale() == "log"
        assert "%" in ax.get_ylabel() and "log" in ax.get_ylabel()
        assert len(data_lines(ax)) == len(PARAMS) + 1  # every tensor and the whole network
        assert len(bands(ax)) == len(PARAMS) + 1
        ticks = {t.get_text(): t.get_position()[0] for t in ax.get_xticklabels()}
        assert ticks["init"] == -1 and ticks["0"] == 0
    lr = 0.01
    ax = axes[LRS.index(lr)]
    whole = next(ln for ln in data_lines(ax) if ln.get_color() == "black")
    assert list(whole.get_xdata()) == [-1, 0, 1]
    t = THRESHOLDS.index("1e-05")
    want = [statistics.mean(100 - awake(s, e, len(PARAMS), t) for s in SEEDS) for e in (-1, 0, 1)]
    assert list(whole.get_ydata()) == pytest.approx(want)
    assert_legend_outside(fig)


def test_sleeping_share_names_what_a_log_axis_cannot_draw(runs):
    layers = runs.layers.copy()
    moved = (layers["param"] == "fc2.bias") & (layers["epoch"] >= 0)
    layers.loc[moved, "sleeping_pct"] = 0.0
    fig = F.sleeping_share(layers)
    assert "0 % (all moved) not drawn: fc2.bias" in fig.axes[0].get_xlabel()


def test_prune_accuracy_log_sparsity_per_variant_with_reference_lines(runs):
    prune = runs.prune[runs.prune["data"] == "mnist"]
    fig = F.prune_accuracy(prune, panel="optimizer.lr")
    axes = fig.axes
    assert len(axes) == len(LRS) * 3
    titles = [ax.get_title().split("\n")[0] for ax in axes]
    assert titles == ["one-shot", "fine-tuned", "rewound"] * len(LRS)
    for ax in axes:
        assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel()
        assert "%" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
        # magnitude and random over two sparsities; sleeping at its own, as a marker
        assert len(bands(ax)) == 2
        assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 1
        refs = {ln.get_gid(): ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_gid()}
        assert refs["chance"] == 0.1
        lr = LRS[axes.index(ax) // 3]
        unpruned = statistics.mean(accuracy(lr, s, EPOCHS) for s in SEEDS)
        assert refs["unpruned"] == pytest.approx(unpruned)
    ax = axes[0]  # one-shot, lr 0.001: random at 0.12 % and 50 %
    random = [ln for ln in data_lines(ax) if len(ln.get_xdata()) == 2]
    xs = sorted(tuple(ln.get_xdata()) for ln in random)
    assert xs == [pytest.approx((0.12, 50.0))] * 2
    assert_legend_outside(fig)


def test_histograms_one_step_line_per_epoch_and_the_exact_zero_share(runs):
    one = runs.histograms[runs.histograms["run"] == runs.runs["run"].iloc[0]]
    fig = F.histograms(one)
    [ax] = [ax for ax in fig.axes if ax.get_visible()]  # only fc1.weight has a histogram
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "|w - w0|" in ax.get_xlabel() and "%" in ax.get_ylabel()
    [stairs] = [p for p in ax.patches if isinstance(p, StepPatch)]  # epoch 0 (init: all zero)
    values = stairs.get_data().values
    total = 52 + 300 + 100000
    assert max(values) == pytest.approx(100 * 100000 / total)
    assert min(v for v in values if v > 0) == pytest.approx(100 * 300 / total)
    assert f"epoch 0: {100 * 52 / total:.3g} %" in ax.texts[0].get_text()
    assert_legend_outside(fig)


def test_signal_propagation_per_scheme_on_a_real_measurement():
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    sp = signal_frame(x, y, ["he", "xavier", "zeros"], seeds=(0, 1), depth=6, width=32)
    fig = F.signal_propagation(sp)
    assert [ax.get_title() for ax in fig.axes] == [
        "activation std, activation=relu",
        "activation std, activation=tanh",
        "gradient std (dL/dz), activation=relu",
        "gradient std (dL/dz), activation=tanh",
    ]
    for ax, (value, act) in zip(
        fig.axes, [(v, a) for v in ("act_std", "grad_std") for a in ("relu", "tanh")], strict=True
    ):
        assert ax.get_yscale() == "log" and ax.get_xlabel().startswith("layer (depth)")
        cell = sp[sp["activation"] == act]
        drawn = [s for s, g in cell.groupby("scheme") if (g[value] > 0).any()]
        # a line and a band (two seeds) per scheme with a value a log axis can show
        assert len(data_lines(ax)) == len(drawn) and len(bands(ax)) == len(drawn)
    # zeros: every activation is 0, which a log axis cannot show: said under the axis
    assert "he" in drawn and "xavier" in drawn
    relu = sp[(sp["activation"] == "relu") & (sp["scheme"] == "he")]
    he = data_lines(fig.axes[0])[0]
    want = relu.groupby("layer")["act_std"].mean()
    assert list(he.get_xdata()) == list(want.index)
    assert list(he.get_ydata()) == pytest.approx(list(want))
    assert_legend_outside(fig)


def test_save_figure_writes_png_and_pdf_and_closes(tmp_path, runs):
    fig = F.mean_delta(runs.layers)
    assert fig.axes[0].get_yscale() == "log"
    paths = F.save_figure(fig, tmp_path / "sub" / "mean_delta")
    assert [p.name for p in paths] == ["mean_delta.png", "mean_delta.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert not plt.fignum_exists(fig.number)


def test_a_frame_without_the_columns_is_one_line_naming_them(runs):
    with pytest.raises(ValueError, match=r"^sleeping_share: the frame has no column 'nope'; "):
        F.sleeping_share(runs.layers, panel="nope")


def test_report_leaves_out_a_figure_with_too_many_panels(runs, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(F, "MAX_PANELS", 2)  # mnist x 2 lrs + fashion: 3 panels
    monkeypatch.setattr(F, "_draw", lambda name, make, stem, formats: [stem])  # no drawing
    with caplog.at_level("WARNING", logger=F.__name__):
        written = F.report_figures(runs, tmp_path)
    assert "sleeping_share" not in [p.name for p in written]
    assert "figure sleeping_share not drawn: 3 subplots (more than 2)" in caplog.text
    assert "figure prune_accuracy not drawn: 9 subplots (more than 2)" in caplog.text


def built(name, make, stem, formats):
    """``_draw`` without the (slow) saving: the figure is built, then closed."""
    plt.close(make())
    return [stem]


def test_report_and_run_figure_sets_build_every_figure(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(F, "_draw", built)
    written = F.report_figures(runs, tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == [
        "histograms/fashion_mnist_he_0.001",
        "histograms/mnist_he_0.001",
        "histograms/mnist_he_0.01",
        "learning_curves",
        "mean_delta",
        "prune_accuracy",
        "sleeping_share",
    ]
    one = load_runs([runs.runs["run"].iloc[0]])
    written = F.run_figures(one, tmp_path / "run")
    assert [p.name for p in written] == [
        "awake_per_epoch",
        "mean_delta_layers",
        "learning_curves",
        "prune_accuracy",
        "delta_histograms",
    ]
