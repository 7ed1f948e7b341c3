"""Dashboards (cdi_experiments.lightning.dashboards): the per-layer awake table, TensorBoard's
hparams, hp_metric, histograms and prune text read back from the event files with
TensorBoard's own reader, and what a W&B run is filed under.

W&B read-back (hidden per-layer charts, the awake table, group/tags/name) is in test_wandb.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_cfg
from pytorch_lightning import loggers as pl_loggers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn

from cdi_experiments.lightning.dashboards import (
    AWAKE_CHART,
    TensorBoardLogger,
    awake_long,
    chart_threshold,
    log_epoch,
    log_prune_results,
    markdown_table,
    per_layer_key,
    wandb_group,
    wandb_name,
    wandb_tags,
)
from cdi_experiments.modules import DELTA_EDGES, delta_stats, init_module

# ----------------------------------------------------------------------------- reading back


def events(log_dir: Path) -> EventAccumulator:
    """Every event file under ``log_dir``, everything kept (no sampling)."""
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def hparams_session(ea: EventAccumulator) -> tuple[dict[str, object], list[str]]:
    """The hparams (name -> value) of the session start, and the experiment's metric tags."""
    params: dict[str, object] = {}
    metrics: list[str] = []
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.WhichOneof("data") == "session_start_info":
            for k, v in data.session_start_info.hparams.items():
                params[k] = v.string_value if v.HasField("string_value") else v.number_value
        elif data.WhichOneof("data") == "experiment":
            metrics = [m.name.tag for m in data.experiment.metric_infos]
    return params, metrics


def scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


# ----------------------------------------------------------------------------- pure helpers


def test_per_layer_keys_are_told_from_totals() -> None:
    layer = ["awake/fc1.weight@1e-05", "awake/Conv2d.weight@0", "delta_q50/fc1.bias"]
    total = ["awake/all@1e-05", "delta_mean/all", "delta_max/all", "val/acc", "epoch"]
    assert [per_layer_key(k) for k in layer] == [True, True, True]
    assert [per_layer_key(k) for k in total] == [False] * len(total)
    assert per_layer_key("delta_max/allow.weight")  # a layer called "allow" is a layer


def test_wandb_group_tags_and_name() -> None:
    assert wandb_group(None, None) is None
    assert wandb_group("mnist_demo", None) == "mnist_demo"
    assert wandb_group(None, "outputs/multirun/2026-12-02/07-01-02") == "2026-12-02/07-01-02"
    assert wandb_group("demo", "/x/sweeps/lr") == "demo/lr"
    assert wandb_group("demo", "/x/demo") == "demo"
    labels = {"model": "mlp", "data": "mnist", "init": "he", "optimizer": "adam", "x": None}
    assert wandb_tags(labels, ["mine", "model:mlp"]) == [
        "mine",
        "model:mlp",
        "data:mnist",
        "init:he",
        "optimizer:adam",
    ]
    assert wandb_tags({"k": "v" * 100}) == ["k:" + "v" * 62]  # W&B's 64-character limit
    a = wandb_name("mlp-mnist-he-s0", "optimizer.lr=0.01")
    b = wandb_name("mlp-mnist-he-s0", "optimizer.lr=0.001")
    assert a != b and a.endswith("optimizer.lr=0.01")


def test_chart_threshold() -> None:
    assert chart_threshold([0.0, 1e-6, 1e-5, 1e-2]) == 1e-5
    assert chart_threshold([0.0, 1e-3, 1e-4]) == 1e-4
    assert chart_threshold([0.0]) == 0.0


def test_awake_table_pools_groups_exactly() -> None:
    """Per layer type, the share is the pooled count over the group's tensors (not the mean of
    their percentages): recomputed here from the raw deltas."""
    rng = np.random.default_rng(0)
    sizes = {"fc1.weight": 300, "fc1.bias": 10, "fc2.weight": 40, "fc2.bias": 3}
    groups = {
        "fc1.weight": "Linear.weight",
        "fc2.weight": "Linear.weight",
        "fc1.bias": "Linear.bias",
        "fc2.bias": "Linear.bias",
    }
    thresholds = [0.0, 1e-3]
    history = []
    deltas = {}
    for epoch in (-1, 0, 1):
        for name, n in sizes.items():
            d = np.abs(rng.normal(0, 1e-3, n)) * (rng.random(n) < 0.6) * (epoch >= 0)
            deltas[(epoch, name)] = d
            row = {"epoch": epoch, "name": name, "numel": n}
            row.update({f"awake_pct@{t:g}": 100 * float(np.mean(d > t)) for t in thresholds})
            history.append(row)
        every = np.concatenate([deltas[(epoch, n)] for n in sizes])
        row = {"epoch": epoch, "name": "all", "numel": every.size}
        row.update({f"awake_pct@{t:g}": 100 * float(np.mean(every > t)) for t in thresholds})
        history.append(row)

    table = awake_long(history, groups)
    assert list(table.columns) == ["epoch", "layer", "threshold", "awake_pct"]
    assert len(table) == 3 * 2 * 3  # epochs x thresholds x (2 types + all)
    for (epoch, t), part in table.groupby(["epoch", "threshold"]):
        assert list(part["layer"]) == ["Linear.weight", "Linear.bias", "all"]
        for layer, got in zip(part["layer"], part["awake_pct"], strict=True):
            names = sizes if layer == "all" else [n for n, g in groups.items() if g == layer]
            pooled = np.concatenate([deltas[(epoch, n)] for n in names])
            assert got == pytest.approx(100 * np.mean(pooled > t), rel=1e-12)
    assert table.loc[table.epoch == -1, "awake_pct"].eq(0).all()
    # log_per="total": the total alone, the history's own row
    total = awake_long(history, dict.fromkeys(sizes, "all"))
    assert set(total["layer"]) == {"all"} and len(total) == 3 * 2
    own = [r for r in history if r["name"] == "all"]
    assert total["awake_pct"].tolist() == [r[f"awake_pct@{t:g}"] for r in own for t in thresholds]


class RecordingWandb(pl_loggers.WandbLogger):
    """A WandbLogger whose experiment records what log_epoch logs (no W&B process)."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    @property
    def experiment(self) -> RecordingWandb:
        return self

    def log(self, payload: dict, commit: bool = False) -> None:
        self.logged.append(payload)


def _moved_model() -> tuple[nn.Module, dict, dict]:
    """A model moved after init, with a NaN and an infinite weight, its analysis per
    parameter and its one-group-per-parameter mapping."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    plan = init_module(model, 1, "he")
    with torch.no_grad():
        model[0].weight[:2] += 1e-3
        model[0].weight[4, 0] = float("nan")
        model[1].weight[0, 0] = float("inf")
    stats = delta_stats(model, plan, (0.0, 1.2345678e-4))
    names = [n for n, _ in model.named_parameters()]
    return model, stats, {n: n for n in names}


def test_histograms_are_bounded_exact_and_skip_non_finite(tmp_path: Path) -> None:
    # TensorBoard: weight counts of the finite weights, read in chunks of 7 elements; the
    # |w - w0| histogram is the analysis' own exact bins (NaN out, inf in the top bin)
    model, stats, groups = _moved_model()
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    log_epoch([tb], model, groups, [], 0, stats, chunk_elems=7)
    tb.experiment.flush()
    ea = events(tmp_path / "tb" / "version_0")
    w = model[0].weight.detach().double().numpy()
    finite = w[np.isfinite(w)]
    [h] = ea.Histograms("weights/0.weight")
    assert h.step == 1 and h.histogram_value.num == finite.size == 29
    assert sum(h.histogram_value.bucket) == 29
    assert (h.histogram_value.min, h.histogram_value.max) == (finite.min(), finite.max())
    assert h.histogram_value.sum == pytest.approx(finite.sum(), rel=1e-12)
    [d] = ea.Histograms("abs_delta_log10/0.weight")
    assert list(d.histogram_value.bucket) == stats["0.weight"].hist.tolist()
    assert sum(d.histogram_value.bucket) == 12  # two rows of 6 moved; the NaN left out
    [inf] = ea.Histograms("abs_delta_log10/1.weight")
    assert inf.histogram_value.bucket[-1] == 1 and sum(inf.histogram_value.bucket) == 1
    assert len(DELTA_EDGES) - 1 == len(d.histogram_value.bucket)


def test_awake_chart_at_a_threshold_with_more_than_six_digits() -> None:
    # the history names thresholds with 6 significant digits: the chart reads them back so
    model, stats, groups = _moved_model()
    history = [
        {"epoch": e, "name": n, "numel": 1, "awake_pct@0": 50.0, "awake_pct@0.000123457": 25.0}
        for e in (-1, 0)
        for n in [*groups, "all"]
    ]
    wb = RecordingWandb()
    log_epoch([wb], model, groups, history, 0, stats)
    [payload] = wb.logged
    chart = payload[AWAKE_CHART]
    assert chart.spec.string_fields["title"] == "awake % per layer (|w - w0| > 0.000123457)"
    assert [row[2] for row in chart.table.data] == [25.0] * 5  # 4 layers and all, epoch 0
    assert sum(payload["weights/0.weight"].histogram) == 29  # the finite weights


def test_markdown_table() -> None:
    df = pd.DataFrame({"criterion": ["sleeping", "a|b"], "acc_after": [0.91234567, float("nan")]})
    assert markdown_table(df, digits=3).splitlines() == [
        "| criterion | acc_after |",
        "|---|---|",
        "| sleeping | 0.912 |",
        "| a\\|b | nan |",
    ]


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_hparams_carry_the_config_and_hp_metric_is_val(tmp_path: Path) -> None:
    run_config = {
        "seed": 3,
        "init": {"scheme": "lecun", "params": {}},
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.05},
        "logger": {"tb": {"_target_": "x"}},  # not an hparam
    }
    lg = TensorBoardLogger(str(tmp_path), name="tb", version="", run_config=run_config)
    lg.log_hyperparams({"model_cfg": {"width": 8}})  # what Lightning passes: replaced
    lg.log_metrics({"train/loss": 1.0}, step=5)
    lg.log_metrics({"val/acc": 0.25, "val/loss": 2.0}, step=10)
    lg.log_metrics({"val/acc": torch.tensor(0.5)}, step=20)
    lg.finalize("success")

    ea = events(tmp_path / "tb")
    params, metrics = hparams_session(ea)
    assert params == {
        "seed": 3.0,
        "init/scheme": "lecun",
        "optimizer/_target_": "torch.optim.SGD",
        "optimizer/lr": 0.05,
    }
    assert metrics == ["hp_metric"]
    assert scalars(ea, "hp_metric") == scalars(ea, "val/acc") == [(10, 0.25), (20, 0.5)]
    assert scalars(ea, "train/loss") == [(5, 1.0)]


def test_tensorboard_without_hp_metric_is_lightnings(tmp_path: Path) -> None:
    lg = TensorBoardLogger(str(tmp_path), name="tb", version="", hp_metric=None)
    lg.log_hyperparams({"lr": 0.1})
    lg.log_metrics({"val/acc": 0.5}, step=1)
    lg.finalize("success")
    ea = events(tmp_path / "tb")
    assert hparams_session(ea)[0] == {"lr": 0.1}
    assert scalars(ea, "hp_metric") == [(0, -1.0)]  # Lightning's placeholder, as documented


def test_prune_table_as_tensorboard_text(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {"criterion": ["sleeping", "magnitude"], "target": ["matched@1e-05"] * 2,
         "sparsity": [0.0005, 0.0005], "acc_after": [0.9, 0.8]}
    )  # fmt: skip
    lg = TensorBoardLogger(str(tmp_path), name="tb", version="")
    log_prune_results([lg], df)
    lg.finalize("success")
    ea = events(tmp_path / "tb")
    [event] = ea.Tensors("prune/results/text_summary")
    assert event.tensor_proto.string_val[0].decode() == markdown_table(df)


@pytest.mark.integration
def test_tiny_run_tensorboard_view(tmp_path: Path) -> None:
    """A 2-epoch run with the TensorBoard logger: histograms of every tracked tensor at each
    analysed epoch (all weights counted; |w - w0| once something moved), hparams with the init
    scheme, hp_metric = each epoch's val/acc, the prune table as text."""
    from cdi_experiments.run.train import train

    run_dir = tmp_path / "run"
    csv = "+logger.csv._target_=cdi_experiments.lightning.csv_logger.ResumableCSVLogger"
    cfg = small_cfg(run_dir, ["logger=tensorboard", csv, "trainer.max_epochs=2", "init=xavier"])
    metrics, objects = train(cfg)

    ea = events(run_dir / "tensorboard")
    model = objects["model"].model
    numel = {n: p.numel() for n, p in model.named_parameters()}
    for name, n in numel.items():
        hist = ea.Histograms(f"weights/{name}")
        assert [h.step for h in hist] == [0, 1, 2]  # epochs trained
        assert all(h.histogram_value.num == n for h in hist)
        moved = ea.Histograms(f"abs_delta_log10/{name}")
        assert [h.step for h in moved] == [1, 2]  # nothing moved at init
    # The last weight histogram is of the trained weights: its range is theirs.
    last = ea.Histograms("weights/fc1.weight")[-1].histogram_value
    w = model.fc1.weight.detach()
    assert (last.min, last.max) == pytest.approx((w.min().item(), w.max().item()))

    params, _ = hparams_session(ea)
    assert params["init/scheme"] == "xavier" and params["seed"] == 0.0
    assert params["data/name"] == "mnist" and params["optimizer/lr"] == pytest.approx(1e-3)
    csv = pd.read_csv(run_dir / "metrics.csv")
    val = csv.dropna(subset=["val/acc"])
    assert [v for _, v in scalars(ea, "hp_metric")] == pytest.approx(val["val/acc"].tolist())
    assert len(val) == 2 and metrics["val/acc"] == pytest.approx(val["val/acc"].iloc[-1])

    [text] = ea.Tensors("prune/results/text_summary")
    lines = text.tensor_proto.string_val[0].decode().splitlines()
    prune = pd.read_csv(run_dir / "prune_results.csv")
    assert lines[0] == "| " + " | ".join(prune.columns) + " |"
    assert len(lines) == 2 + len(prune)
