"""The prune stage at the end of ``cdi-train`` and the standalone ``cdi-prune``, checked
against counts recomputed independently from the checkpoint's weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import quick_cfg

from cdi_experiments import DeterministicNoiseGenerator, layer_id_for
from cdi_experiments.cli import prune as prune_mod
from cdi_experiments.lightning.classifier import Classifier
from cdi_experiments.run import train as train_mod

pytestmark = pytest.mark.integration  # trains a model, runs cdi-prune

REPO = Path(__file__).resolve().parent.parent
CDI_PRUNE = Path(sys.executable).parent / "cdi-prune"
PRUNABLE = {"fc1.weight": (128, 784), "fc2.weight": (64, 128), "fc3.weight": (10, 64)}
THRESHOLD = 1e-5
RANKED = ("magnitude", "movement", "magnitude_increase", "random")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 epochs of the MLP on 1000 MNIST images, he init; prune at 1e-5 and 0.5/0.8.
    ``import wandb`` is made to fail: with the csv logger nothing may touch W&B."""
    run_dir = tmp_path_factory.mktemp("prune_run")
    cfg = quick_cfg(run_dir, "trainer.max_epochs=2", "prune.sparsities=[0.5,0.8]")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", None)
        metrics, objects = train_mod.train(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    weights = {n: state[f"model.{n}"].numpy() for n in PRUNABLE}
    gen = DeterministicNoiseGenerator(0)
    deltas = {
        n: np.abs(
            w.astype(np.float64)
            - gen.init_matrix(layer_id_for(n), w.shape, "he").astype(np.float64)
        )
        for n, w in weights.items()
    }
    return SimpleNamespace(
        dir=run_dir,
        ckpt=ckpt,
        table=pd.read_csv(run_dir / "prune_results.csv"),
        metrics=pd.read_csv(run_dir / "metrics.csv"),
        deltas=deltas,
        objects=objects,
    )


def pruned_counts(row) -> dict[str, int]:
    """Per-layer pruned counts from the row's ``layer_sparsity`` JSON."""
    return {
        n: round(f * np.prod(PRUNABLE[n])) for n, f in json.loads(row["layer_sparsity"]).items()
    }


def test_sleeping_row_prunes_exactly_the_unmoved_weights(run):
    sleeping = run.table[run.table["criterion"] == "sleeping"]
    assert list(sleeping["target"]) == ["matched@1e-05"]  # no target-sparsity row for it
    row = sleeping.iloc[0]
    expected = {n: int((d <= THRESHOLD).sum()) for n, d in run.deltas.items()}
    assert pruned_counts(row) == expected
    assert row["num_pruned"] == sum(expected.values()) > 0
    total = sum(np.prod(s) for s in PRUNABLE.values())
    assert row["sparsity"] == pytest.approx(sum(expected.values()) / total, rel=1e-12)


def test_matched_criteria_prune_the_same_count_per_layer(run):
    matched = run.table[run.table["target"] == "matched@1e-05"]
    assert list(matched["criterion"]) == ["sleeping", *RANKED]
    ref = pruned_counts(matched.iloc[0])
    for _, row in matched.iterrows():
        assert pruned_counts(row) == ref, row["criterion"]
        assert row["layer_sparsity"] == matched.iloc[0]["layer_sparsity"]
        assert row["num_pruned"] == matched.iloc[0]["num_pruned"]
    # movement ranks by the same |w - w0|: at the matched counts it selects the sleeping set
    by = matched.set_index("criterion")
    assert by.loc["movement", "acc_after"] == by.loc["sleeping", "acc_after"]


def test_sleeping_accuracy_after_pruning_recomputed(run):
    lit = Classifier.load_from_checkpoint(str(run.ckpt), map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, d in run.deltas.items():
            param = lit.model.get_parameter(name)
            param[torch.from_numpy(d <= THRESHOLD)] = 0.0
    dm = run.objects["datamodule"]
    acc = lit.evaluate(dm.test_dataloader())["acc"]
    row = run.table[run.table["criterion"] == "sleeping"].iloc[0]
    assert row["acc_after"] == pytest.approx(acc, abs=1e-12)
    assert row["acc_delta"] == pytest.approx(row["acc_after"] - row["acc_before"], abs=1e-12)


def test_acc_before_is_the_runs_test_accuracy(run):
    test_acc = run.metrics["test/acc"].dropna()
    assert len(test_acc) == 1
    assert (run.table["acc_before"] - test_acc.iloc[0]).abs().max() <= 1e-6
    assert run.table["acc_before"].nunique() == 1


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_target_sparsity_rows_prune_round_f_numel_per_layer(run, fraction):
    rows = run.table[run.table["target"] == f"{fraction:g}"]
    assert list(rows["criterion"]) == list(RANKED)
    expected = {n: round(fraction * np.prod(s)) for n, s in PRUNABLE.items()}
    for _, row in rows.iterrows():
        per_layer = json.loads(row["layer_sparsity"])
        for n, k in expected.items():
            assert per_layer[n] == k / np.prod(PRUNABLE[n]), (row["criterion"], n)
        assert row["num_pruned"] == sum(expected.values())
    # magnitude pruning at 50% costs less than random pruning at 50% on a trained net
    by = rows.set_index("criterion")
    assert by.loc["magnitude", "acc_after"] > by.loc["random", "acc_after"]


# ----------------------------------------------------------------------------- cdi-prune


def test_cdi_prune_subprocess_reproduces_the_stage_table(run, tmp_path):
    before = (run.dir / "prune_results.csv").read_bytes()
    out = tmp_path / "elsewhere"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(CDI_PRUNE), str(run.ckpt), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    again = pd.read_csv(out / "prune_results.csv")
    pd.testing.assert_frame_equal(again, run.table, check_exact=True)
    assert (run.dir / "prune_results.csv").read_bytes() == before  # --out: run dir untouched
    # a readable console table: header, one aligned line per row, the output path
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["criterion", "target"])
    body = lines[header + 1 : header + 1 + len(run.table)]
    assert [line.split()[0] for line in body] == list(run.table["criterion"])
    assert len({len(line) for line in lines[header : header + 1 + len(run.table)]}) == 1
    assert "layer_sparsity" not in lines[header]
    assert f"prune table: {out / 'prune_results.csv'}" in proc.stdout


def test_cdi_prune_in_process_same_values_and_no_wandb(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any W&B call would fail the run
    assert prune_mod.main([str(run.ckpt), "--out", str(tmp_path)]) == 0
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "prune_results.csv"), run.table, check_exact=True
    )
    assert "matched@1e-05" in capsys.readouterr().out


def test_cdi_prune_rewind_and_finetune_add_their_columns(run, tmp_path):
    code = prune_mod.main(
        [
            str(run.ckpt),
            "--out",
            str(tmp_path),
            "--criteria",
            "sleeping,magnitude",
            "--sparsities",
            "0.5",
            "--rewind",
            "--retrain-epochs",
            "1",
            "--finetune-epochs",
            "1",
        ]
    )
    assert code == 0
    df = pd.read_csv(tmp_path / "prune_results.csv")
    assert list(df["criterion"]) == ["sleeping", "magnitude", "magnitude"]
    assert list(df["target"]) == ["matched@1e-05", "matched@1e-05", "0.5"]
    assert {"acc_finetuned", "acc_rewound"} <= set(df.columns)
    assert df[["acc_finetuned", "acc_rewound"]].notna().all().all()
    # retraining a rewound 50% ticket for one epoch learns (an untrained net is at ~10%)
    assert df["acc_rewound"].iloc[2] > 0.5
    # the untouched columns equal the stage's own rows
    stage = run.table.set_index(["criterion", "target"])
    for _, r in df.iterrows():
        assert r["acc_after"] == stage.loc[(r["criterion"], r["target"]), "acc_after"]


@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": {}}, d / "plain.ckpt")
    (d / "garbage.ckpt").write_bytes(b"\x00not a zip file at all" * 10)
    return d


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["{missing}"], "does not exist"),
        (["{plain}"], "is not a cdi-train checkpoint: it has no DeterministicInitCallback state"),
        (["{garbage}"], "is truncated or not a torch checkpoint \\(220 bytes of something else\\)"),
        (["{ckpt}", "--criteria", "sleeping,magnitud"], "unknown criterion 'magnitud'"),
        (["{ckpt}", "--sparsities", "0.5,1.5"], "'1.5' is not a fraction in \\(0, 1\\)"),
        (["{ckpt}", "--sparsities", "half"], "'half' is not a fraction"),
        (["{ckpt}", "--threshold", "-1"], "--threshold -1.0 must be"),
        (["{ckpt}", "--finetune-epochs", "-1"], "--finetune-epochs must be >= 0"),
        (["{ckpt}", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cdi_prune_bad_input_one_line_exit_2_nothing_written(
    run, foreign_files, tmp_path, capsys, args, match
):
    paths = {
        "missing": tmp_path / "nope.ckpt",
        "plain": foreign_files / "plain.ckpt",
        "garbage": foreign_files / "garbage.ckpt",
        "ckpt": run.ckpt,
    }
    out = tmp_path / "out"
    argv = [a.format(**paths) for a in args] + ["--out", str(out)]
    assert prune_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cdi-prune: error: "), err
    assert re.search(match, err), err
    assert not out.exists()


def test_cdi_prune_subprocess_bad_sparsity(run, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(CDI_PRUNE), str(run.ckpt), "--sparsities", "1.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "cdi-prune: error: --sparsities: '1.5' is not a fraction in (0, 1); write e.g. 0.5,0.9"
    ]
    assert not out.exists()
