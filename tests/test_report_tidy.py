"""``cdi-report``'s tidy frames and ``--group-by``, on run folders written in the formats
``cdi-train`` writes (the config is the real composed one; the numbers are chosen here, so
every expected value is known without re-running the report's own pandas)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from cdi_experiments.cli import report as report_cli
from cdi_experiments.run import report
from cdi_experiments.run.runs import Runs, load_runs
from cdi_experiments.run.schema import plain, task_config
from cdi_experiments.run.status import write_status

THRESHOLDS = ("0", "1e-06", "1e-05", "0.0001", "0.001", "0.01")
PARAMS = {"fc1.weight": 100352, "fc1.bias": 128, "fc2.weight": 8192, "fc2.bias": 64}
EPOCHS = 2


def composed_config() -> dict:
    """The composed default config, as ``run_info.json`` stores it."""
    cfg = compose_cfg(["logger=csv"], hydra_node=False)
    return plain(task_config(cfg))


@pytest.fixture(scope="module")
def base_config() -> dict:
    return composed_config()


def awake(run_seed: int, epoch: int, param: int, t: int) -> float:
    """The awakened share the synthetic runs write: distinct per cell, falling with t."""
    if epoch < 0:
        return 0.0
    return 100.0 - (t + 1) * (param + 1) * 0.5 / (epoch + 1) - 0.01 * run_seed


def accuracy(lr: float, seed: int, epoch: int) -> float:
    return round(0.5 + 0.1 * epoch + 100 * lr + 0.01 * seed, 6)


def write_run(
    root: Path,
    cfg: dict,
    *,
    name: str,
    lr: float,
    seed: int,
    optimizer: str = "torch.optim.Adam",
    logger: str = "csv",
    test_acc: float | None = None,
    data: str | None = None,
) -> Path:
    """A finished run directory with the files ``cdi-train`` writes, in their formats."""
    run = root / name
    run.mkdir(parents=True)
    cfg = json.loads(json.dumps(cfg))
    cfg["seed"] = seed
    cfg["data"]["seed"] = seed  # data.seed: ${seed}, as composed
    cfg["optimizer"] = {"_target_": optimizer, "lr": lr, "weight_decay": 0.0}
    cfg["trainer"]["max_epochs"] = EPOCHS
    cfg["run_dir"] = str(run)
    if data is not None:
        cfg["data"]["name"] = data
    test = accuracy(lr, seed, EPOCHS) if test_acc is None else test_acc
    info = {
        "config": cfg,
        "model_name": "mlp",
        "generator": {"version": 1, "fingerprint": f"fp{seed}"},
        "final_metrics": {"test/acc": test, "test/loss": 1.5},
    }
    (run / "run_info.json").write_text(json.dumps(info))
    rows = []
    for e in range(EPOCHS):
        rows.append(f"{e},{8 * e + 7},,,,,{accuracy(lr, seed, e)},0.9")
        rows.append(f"{e},{8 * e + 7},,,{accuracy(lr, seed, e) - 0.05},1.1,,")
    rows.append(f"{EPOCHS},{8 * EPOCHS},{test},1.5,,,,")  # Lightning's test row: one epoch on
    if logger == "csv":
        (run / "metrics.csv").write_text(
            "epoch,step,test/acc,test/loss,train/acc,train/loss,val/acc,val/loss\n"
            + "\n".join(rows)
            + "\n"
        )
    elif logger == "wandb":
        (run / "wandb").mkdir()
    layer_rows = []
    for e in range(-1, EPOCHS):
        for p, (param, numel) in enumerate([*PARAMS.items(), ("all", sum(PARAMS.values()))]):
            cells = ",".join(f"{awake(seed, e, p, t)!r}" for t in range(len(THRESHOLDS)))
            layer_rows.append(f"{e},{param},{numel},{0.001 * (e + 1)},{0.01 * (e + 1)},{cells}")
    (run / "layer_changes.csv").write_text(
        "epoch,name,numel,mean_delta,max_delta,"
        + ",".join(f"awake_pct@{t}" for t in THRESHOLDS)
        + "\n"
        + "\n".join(layer_rows)
        + "\n"
    )
    layer_sparsity = json.dumps({"fc1.weight": 0.001, "fc2.weight": 0.01})
    before = test
    (run / "prune_results.csv").write_text(
        "criterion,target,sparsity,num_pruned,acc_before,acc_after,acc_delta,acc_finetuned,"
        "acc_rewound,layer_sparsity\n"
        + "\n".join(
            f"{c},{tgt},{s},{int(s * 108544)},{before},{before - d},{-d},{before - d / 2},"
            f'{before - d / 3},"{layer_sparsity.replace(chr(34), chr(34) * 2)}"'
            for c, tgt, s, d in [
                ("sleeping", "matched@1e-05", 0.0012, 0.001),
                ("magnitude", "matched@1e-05", 0.0012, 0.0),
                ("magnitude", "sparsity@0.5", 0.5, 0.02),
                ("random", "matched@1e-05", 0.0012, 0.002),
                ("random", "sparsity@0.5", 0.5, 0.3),
            ]
        )
        + "\n"
    )
    (run / "delta_histograms.csv").write_text(
        "epoch,name,low,high,count\n-1,fc1.weight,0.0,0.0,100352\n"
        "0,fc1.weight,0.0,0.0,52\n0,fc1.weight,1e-05,1.333521432163324e-05,300\n"
        "0,fc1.weight,0.001,0.0013335214321633239,100000\n"
    )
    write_status(run, "finished", f"{seed:064d}")
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, base_config) -> Path:
    """A nested sweep: two learning rates x three seeds, AdamW, below sweep/lr=<lr>/<seed>."""
    root = tmp_path_factory.mktemp("sweep")
    for lr in (0.001, 0.01):
        for seed in (0, 1, 2):
            write_run(
                root / f"lr={lr}",
                base_config,
                name=str(seed),
                lr=lr,
                seed=seed,
                optimizer="torch.optim.AdamW",
            )
    return root


@pytest.fixture(scope="module")
def runs(sweep) -> Runs:
    return load_runs([sweep])


def test_layers_frame_is_one_row_per_run_epoch_param_threshold(runs, sweep):
    layers = runs.layers
    assert len(layers) == 6 * (EPOCHS + 1) * (len(PARAMS) + 1) * len(THRESHOLDS)
    keys = ["run", "epoch", "param", "threshold"]
    assert not layers.duplicated(keys).any()
    run = str(sweep / "lr=0.01" / "2")
    p = list(PARAMS).index("fc2.weight")
    for e in range(-1, EPOCHS):
        for k, t in enumerate(THRESHOLDS):
            row = layers[
                (layers["run"] == run)
                & (layers["epoch"] == e)
                & (layers["param"] == "fc2.weight")
                & (layers["threshold"] == float(t))
            ]
            assert len(row) == 1
            assert row["awake_pct"].iloc[0] == awake(2, e, p, k)
            assert row["sleeping_pct"].iloc[0] == pytest.approx(100 - awake(2, e, p, k))
            assert row["optimizer.lr"].iloc[0] == 0.01
            assert row["seed"].iloc[0] == 2
    # the initial weights keep the CSV's epoch -1, labelled init, and have no train metrics
    init = layers[layers["epoch"] == -1]
    assert set(init["epoch_label"]) == {"init"} and init["val/acc"].isna().all()
    first = layers[(layers["run"] == run) & (layers["epoch"] == 0)]
    assert set(first["epoch_label"]) == {"0"}
    assert set(first["val/acc"]) == {accuracy(0.01, 2, 0)}
    assert set(first["train/acc"]) == {accuracy(0.01, 2, 0) - 0.05}


def test_every_config_value_is_a_column_with_status_and_fingerprints(runs, sweep, base_config):
    row = runs.runs.set_index("run").loc[str(sweep / "lr=0.001" / "1")]
    assert row["optimizer"] == "adamw"
    assert row["optimizer._target_"] == "torch.optim.AdamW"
    assert row["optimizer.lr"] == 0.001
    assert row["init.scheme"] == base_config["init"]["scheme"] == row["init"]
    assert row["data.name"] == row["data"] == base_config["data"]["name"]
    assert row["data.normalize"] == base_config["data"]["normalize"]
    assert row["model.hidden"] == json.dumps(base_config["model"]["hidden"])
    assert row["trainer.max_epochs"] == EPOCHS
    assert row["status"] == "finished"
    assert row["config_sha256"] == f"{1:064d}"
    assert row["init_fingerprint"] == "fp1" and row["config_source"] == "run_info.json"
    assert not any(c.startswith(("callbacks.", "logger.")) for c in runs.runs.columns)
    assert "run_dir" not in runs.runs.columns
    # every tidy frame carries the same run-level columns
    for name in runs.FRAMES:
        frame = getattr(runs, name)
        assert {"optimizer.lr", "seed", "status", "init_fingerprint"} <= set(frame.columns), name
    assert runs.varying() == ["optimizer.lr"]


def test_list_valued_fields_are_long_form_not_json(runs, sweep):
    pl = runs.prune_layers
    one = pl[(pl["run"] == str(sweep / "lr=0.01" / "0")) & (pl["criterion"] == "sleeping")]
    assert dict(zip(one["param"], one["layer_sparsity"], strict=True)) == {
        "fc1.weight": 0.001,
        "fc2.weight": 0.01,
    }
    for name in runs.FRAMES:
        frame = getattr(runs, name)
        text = frame[[c for c in frame.columns if pd.api.types.is_string_dtype(frame[c])]]
        for c in text.columns:
            if c.startswith(("model.", "tracking.", "prune.", "init.", "data.", "optimizer.")):
                continue  # config lists, as "[...]" text to group by
            assert not text[c].astype(str).str.startswith(("{", "[")).any(), (name, c)


def test_prune_frame_has_one_row_per_variant(runs, sweep):
    pr = runs.prune
    run = str(sweep / "lr=0.001" / "0")
    rows = pr[(pr["run"] == run) & (pr["criterion"] == "random") & (pr["target"] == "sparsity@0.5")]
    before = accuracy(0.001, 0, EPOCHS)
    assert dict(zip(rows["variant"], rows["acc"], strict=True)) == pytest.approx(
        {"one-shot": before - 0.3, "fine-tuned": before - 0.15, "rewound": before - 0.1}
    )
    assert set(rows["source"]) == {"train"}


def test_test_row_lands_on_the_last_trained_epoch(runs, sweep):
    ep = runs.epochs[runs.epochs["run"] == str(sweep / "lr=0.01" / "1")].set_index("epoch")
    assert list(ep.index) == [0, 1]
    assert ep.loc[1, "test/acc"] == accuracy(0.01, 1, EPOCHS)
    assert math.isnan(ep.loc[0, "test/acc"])
    assert ep.loc[1, "val/acc"] == accuracy(0.01, 1, 1)


def test_group_by_gives_mean_std_and_count_over_seeds(runs):
    g = report.aggregate(runs.runs, ["optimizer.lr"], ["test/acc", "val/acc"]).set_index(
        "optimizer.lr"
    )
    for lr in (0.001, 0.01):
        tests = [accuracy(lr, s, EPOCHS) for s in (0, 1, 2)]
        assert g.loc[lr, "test/acc_mean"] == pytest.approx(statistics.mean(tests))
        assert g.loc[lr, "test/acc_std"] == pytest.approx(statistics.stdev(tests))
        assert g.loc[lr, "test/acc_count"] == 3 and g.loc[lr, "n_runs"] == 3
    # the tidy frame groups the same way: per epoch, tensor and threshold
    lg = report.aggregate(
        runs.layers, ["optimizer.lr", "epoch", "param", "threshold"], ["sleeping_pct"]
    )
    cell = lg[(lg["optimizer.lr"] == 0.01) & (lg["epoch"] == 1) & (lg["param"] == "all")]
    cell = cell[cell["threshold"] == 1e-5]
    want = [100 - awake(s, 1, len(PARAMS), 2) for s in (0, 1, 2)]
    assert cell["sleeping_pct_mean"].iloc[0] == pytest.approx(statistics.mean(want))
    assert cell["sleeping_pct_std"].iloc[0] == pytest.approx(statistics.stdev(want))


def test_cli_writes_csv_markdown_and_latex_with_the_swept_values(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(sweep), "--out", str(out), "--group-by", "optimizer.lr", "--no-figures"]
    code = report_cli.main(argv)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    table = pd.read_csv(out / "runs.csv")
    assert sorted(table["optimizer.lr"]) == [0.001] * 3 + [0.01] * 3
    md = (out / "runs.md").read_text().splitlines()
    assert md[0].startswith("| label | data | model | optimizer | init | seed | epochs |")
    assert "| optimizer.lr |" in md[0] and "data.batch_size" not in md[0]
    assert len(md) == 2 + 6
    tex = (out / "runs.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex
    assert "optimizer.lr" in tex and "test/acc" in tex and "awake\\_all@1e-05" in tex
    grouped = pd.read_csv(out / "grouped.csv").set_index("optimizer.lr")
    tests = [accuracy(0.01, s, EPOCHS) for s in (0, 1, 2)]
    assert grouped.loc[0.01, "test/acc_mean"] == pytest.approx(statistics.mean(tests))
    gmd = (out / "grouped.md").read_text()
    want = f"{statistics.mean(tests):.4g} ± {statistics.stdev(tests):.4g}"
    assert want in gmd
    assert want.replace("±", "$\\pm$") in (out / "grouped.tex").read_text()
    assert "grouped by optimizer.lr (mean, std, count over runs):" in stdout
    for name in ("layers", "epochs", "prune", "prune_layers", "histograms"):
        tidy = pd.read_csv(out / "tidy" / f"{name}.csv")
        assert set(tidy["optimizer.lr"]) == {0.001, 0.01}, name
        assert {"run", "seed", "status", "init_fingerprint"} <= set(tidy.columns), name
        assert "data.batch_size" not in tidy.columns  # the same for every run: in runs.csv
    assert "data.batch_size" in table.columns
    assert len(pd.read_csv(out / "tidy" / "layers.csv")) == 6 * 3 * 5 * 6
    assert not (out / "figures").exists() and "0 figures" in stdout


def test_unknown_group_by_column_is_one_line_and_exit_2(sweep, tmp_path, capsys):
    code = report_cli.main([str(sweep), "--out", str(tmp_path / "o"), "--group-by", "lr"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(
        "cdi-report: error: --group-by column 'lr' is not in the table; did you mean 'optimizer.lr'"
    )
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_tensorboard_only_run_reads_its_event_files(tmp_path, base_config):
    from torch.utils.tensorboard import SummaryWriter

    run = write_run(tmp_path, base_config, name="tb", lr=0.001, seed=0, logger="tensorboard")
    writer = SummaryWriter(str(run / "tensorboard"))
    for e in range(EPOCHS):  # as Lightning logs: the metric and the epoch at the same step
        writer.add_scalar("val/acc", accuracy(0.001, 0, e), 8 * e + 7)
        writer.add_scalar("train/acc", accuracy(0.001, 0, e) - 0.05, 8 * e + 7)
        writer.add_scalar("epoch", e, 8 * e + 7)
    writer.add_scalar("test/acc", 0.42, 16)
    writer.add_scalar("epoch", EPOCHS, 16)
    writer.close()
    runs = load_runs([tmp_path])
    ep = runs.epochs.set_index("epoch")
    assert ep.loc[1, "val/acc"] == pytest.approx(accuracy(0.001, 0, 1), rel=1e-6)
    assert ep.loc[0, "train/acc"] == pytest.approx(accuracy(0.001, 0, 0) - 0.05, rel=1e-6)
    assert ep.loc[1, "test/acc"] == pytest.approx(0.42, rel=1e-6)
    assert "problems" not in runs.runs.columns


def test_wandb_only_run_is_named_with_its_missing_metrics(tmp_path, base_config):
    write_run(tmp_path, base_config, name="wb", lr=0.001, seed=0, logger="wandb", test_acc=0.7)
    table = load_runs([tmp_path]).runs
    row = table.iloc[0]
    assert row["problems"].startswith("metrics.csv missing (a W&B-only run: ")
    assert row["test/acc"] == 0.7  # from run_info.json's final metrics
    assert math.isnan(row["val/acc"]) if "val/acc" in row else True


def test_config_from_hydra_yaml_when_run_info_is_missing(tmp_path, base_config):
    run = write_run(tmp_path, base_config, name="h", lr=0.003, seed=4)
    cfg = json.loads((run / "run_info.json").read_text())["config"]
    (run / "run_info.json").unlink()
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    row = load_runs([tmp_path]).runs.iloc[0]
    assert row["config_source"] == ".hydra/config.yaml"
    assert row["optimizer.lr"] == 0.003 and row["seed"] == 4


def test_a_corrupt_layer_file_is_named_and_the_rest_is_read(tmp_path, base_config):
    run = write_run(tmp_path, base_config, name="c", lr=0.001, seed=0)
    (run / "layer_changes.csv").write_text("epoch,name\n0,fc1.weight\n")
    runs = load_runs([tmp_path])
    assert runs.runs.iloc[0]["problems"] == (
        "layer_changes.csv corrupt (no max_delta, mean_delta, numel column)"
    )
    assert runs.layers.empty and len(runs.epochs) == EPOCHS


def test_mlflow_only_run_reads_its_file_store(tmp_path, base_config):
    run = write_run(tmp_path, base_config, name="mlf", lr=0.001, seed=0, logger="mlflow")
    metrics = run / "mlruns" / "1234" / "abcd" / "metrics"
    (metrics / "val").mkdir(parents=True)
    # MLflow's file store: one "timestamp value step" line per logged value
    (metrics / "epoch").write_text("1 0.0 7\n2 0.0 7\n3 1.0 15\n4 2.0 16\n")
    (metrics / "val" / "acc").write_text("1 0.61 7\n3 0.73 15\n")
    (metrics / "test").mkdir()
    (metrics / "test" / "acc").write_text("4 0.69 16\n")
    ep = load_runs([tmp_path]).epochs.set_index("epoch")
    assert ep["val/acc"].to_dict() == {0: 0.61, 1: 0.73}
    assert ep.loc[1, "test/acc"] == 0.69


def test_weight_histograms_come_from_the_tensorboard_logger(tmp_path, base_config):
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from cdi_experiments.run import figures

    run = write_run(tmp_path, base_config, name="tbh", lr=0.001, seed=0)
    rng = np.random.default_rng(0)
    weights = {e: rng.normal(0, 0.05 * (e + 2), 5000) for e in (-1, 0, 1)}
    writer = SummaryWriter(str(run / "tensorboard"))
    for e, w in weights.items():  # as the dashboards log them: step = epoch + 1
        writer.add_histogram("weights/fc1.weight", w, global_step=e + 1)
    writer.close()
    hist = load_runs([tmp_path]).histograms
    wh = hist[hist["kind"] == "weight"]
    assert sorted(wh["epoch"].unique()) == [-1, 0, 1]
    for e, w in weights.items():
        rows = wh[wh["epoch"] == e]
        assert rows["count"].sum() == w.size
        assert rows["low"].min() == pytest.approx(w.min()) and rows["high"].max() == pytest.approx(
            w.max()
        )
        mid = (rows["low"] + rows["high"]) / 2
        assert (mid * rows["count"]).sum() / w.size == pytest.approx(w.mean(), abs=0.01)
    fig = figures.histograms(hist)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["fc1.weight: weights", "fc1.weight: |w - w0|"]
    weight_ax, delta_ax = fig.axes[:2]
    assert weight_ax.get_xscale() == "linear" and delta_ax.get_xscale() == "log"
    assert "equal bins" in weight_ax.get_ylabel() and delta_ax.get_yscale() == "log"
    for patch in weight_ax.patches:  # every entry in one of the equal bins: 100 %
        assert patch.get_data().values.sum() == pytest.approx(100)
    assert len(weight_ax.patches) == 3  # init, epoch 0 and epoch 1
    assert "epoch init" in [t.get_text() for t in fig.legends[0].get_texts()]
