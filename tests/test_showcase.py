"""cdi-showcase end to end on a real MNIST subset: files, verdict lines, numbers that an
independent recomputation from the saved model and its regenerated init agrees with."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cdi_experiments import datasets as ds
from cdi_experiments.cli import showcase as showcase_cli
from cdi_experiments.modules import InitPlan
from cdi_experiments.run import showcase

LIMIT = 3000
WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = showcase_cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    if not ds.is_ready("mnist"):
        ds.fetch("mnist")
    out = tmp_path_factory.mktemp("showcase")
    code, stdout, stderr = _main("--limit", str(LIMIT), "--epochs", "1", "--out", str(out))
    assert code == 0, stderr
    return out, stdout


@pytest.mark.integration
def test_writes_tables_with_expected_columns(run):
    out, _ = run
    layers = pd.read_csv(out / showcase.LAYERS_CSV)
    prune = pd.read_csv(out / showcase.PRUNE_CSV)
    assert list(layers["name"]) == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
        "__total__",
    ]
    for t in ("0", "1e-06", "1e-05", "0.0001", "0.001"):
        assert {f"changed@{t}", f"awake_pct@{t}"} <= set(layers.columns)
    assert {"criterion", "target", "sparsity", "acc_before", "acc_after", "acc_delta"} <= set(
        prune.columns
    )
    assert set(prune["target"]) == {"matched@0", "matched@1e-05", "0.65"}
    assert not list(out.glob(".*"))  # no temporary files left behind


@pytest.mark.integration
def test_prints_verdict_lines_computed_from_the_data(run):
    out, stdout = run
    summary = json.loads((out / showcase.SUMMARY_JSON).read_text())
    share_line = next(ln for ln in stdout.splitlines() if "% of weights sleep" in ln)
    expected = "reproduced" if 60 <= 100 * summary["sleeping_share"] <= 70 else "NOT reproduced"
    assert share_line.endswith(f"-> {expected}")
    assert f"{100 * summary['sleeping_share']:.2f}%" in share_line
    assert any("pruning them costs <0.001 accuracy" in ln for ln in stdout.splitlines())
    assert f"Input pixels that are 0 in all {LIMIT:,} training images" in stdout
    assert all(line in stdout for line in summary["verdict_lines"])


@pytest.mark.parametrize(
    ("share", "delta", "share_verdict", "cost_verdict"),
    [
        (0.65, -0.0005, "-> reproduced", "-> reproduced"),
        (0.031, -0.0005, "-> NOT reproduced", "-> reproduced, but at 3.10% sparsity"),
        (0.70, -0.001, "-> reproduced", "-> NOT reproduced"),
        (0.7001, +0.002, "-> NOT reproduced", "-> reproduced"),
    ],
)
def test_verdicts_follow_the_measured_numbers(share, delta, share_verdict, cost_verdict):
    facts = {
        "normalization": "x",
        "sleeping_share": share,
        "sleeping_weights": round(share * 1000),
        "prunable_weights": 1000,
        "sleeping_share_at_0": share / 2,
        "acc_before": 0.9,
        "matched_acc_delta": {"sleeping": delta, "random": -0.1},
        "same_set_as_sleeping": {"random": False},
    }
    table = pd.DataFrame({"criterion": ["sleeping"], "target": ["matched@1e-05"]})
    lines = showcase._claim_lines(facts, table, 1e-5, None)
    assert lines[1].endswith(share_verdict)
    assert lines[2].endswith(cost_verdict) or cost_verdict + "," in lines[2]


@pytest.mark.integration
def test_sleeping_share_agrees_with_an_independent_recomputation(run):
    out, _ = run
    saved = torch.load(out / showcase.MODEL_PT, weights_only=True)
    plan = InitPlan.from_dict(saved["plan"])
    assert plan.fingerprint() == saved["plan_fingerprint"]
    state = saved["state_dict"]
    moved = {n: (state[n].double() - plan.initial(n).double()).abs() for n in plan.names()}
    sleeping = sum(int((moved[n] <= 1e-5).sum()) for n in WEIGHTS)
    share = sleeping / sum(state[n].numel() for n in WEIGHTS)

    summary = json.loads((out / showcase.SUMMARY_JSON).read_text())
    prune = pd.read_csv(out / showcase.PRUNE_CSV).set_index(["criterion", "target"])
    layers = pd.read_csv(out / showcase.LAYERS_CSV).set_index("name")
    assert summary["sleeping_weights"] == sleeping
    assert summary["sleeping_share"] == pytest.approx(share, rel=1e-12)
    assert prune.loc[("sleeping", "matched@1e-05"), "sparsity"] == pytest.approx(share, rel=1e-12)
    assert prune.loc[("sleeping", "matched@1e-05"), "num_pruned"] == sleeping
    for name in plan.names():
        assert layers.loc[name, "changed@1e-05"] == int((moved[name] > 1e-5).sum()), name
        assert layers.loc[name, "changed@0"] == int((moved[name] > 0).sum()), name


@pytest.mark.integration
def test_always_zero_pixels_counted_and_their_columns_frozen_without_centering(run):
    out, _ = run
    summary = json.loads((out / showcase.SUMMARY_JSON).read_text())
    images, _ = ds.load_tensors("mnist", train=True)
    zero = (images[:LIMIT].reshape(LIMIT, -1) == 0).all(dim=0)
    assert summary["always_zero_pixels"] == int(zero.sum()) > 0
    control = summary["control"]
    assert control["zero_pixel_input_value"] == 0.0
    # a zero input gives zero gradients, so Adam leaves those columns bit-identical
    assert control["always_zero_pixels_unchanged"] == int(zero.sum())


@pytest.mark.integration
def test_quiet_rerun_is_deterministic(run, tmp_path):
    out, _ = run
    code, stdout, stderr = _main(
        "--limit", str(LIMIT), "--epochs", "1", "--out", str(tmp_path), "--quiet", "--no-control"
    )
    assert code == 0, stderr
    assert "epoch 1/1" not in stdout and "% of weights sleep" in stdout
    for name in (showcase.LAYERS_CSV, showcase.PRUNE_CSV):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize(
    "argv",
    [["--epochs", "0"], ["--bogus"], ["--threshold", "-1"], ["--limit", "70000"], ["--seed", "x"]],
)
def test_bad_flag_exits_2_with_one_stderr_line(argv):
    code, stdout, stderr = _main(*argv)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdi-showcase: error: "), stderr
