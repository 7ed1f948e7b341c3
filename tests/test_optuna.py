"""Tuning with Optuna (``hydra/sweeper=optuna_val``) on a validation objective, never test.

``cdi-train`` returns the run's last ``objective`` (``val/acc`` by default); the schema refuses
objectives measured on the test set; the sweep's search space (Optuna's ``interval(...)``
syntax included) is checked before the first trial. The integration test runs a real 2-trial
study and reads what each job returned back through a Hydra callback (:class:`RecordReturn`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import REPO, cli_ok, compose_cfg, run_cli
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from cdi_experiments.run.preflight import preflight
from cdi_experiments.run.schema import ConfigError, check_config, sweep_values, task_config

RETURNED = "returned.json"


class RecordReturn(Callback):
    """A Hydra callback: each job's return value (what the sweeper gets) into its directory."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        out = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        (out / RETURNED).write_text(json.dumps({"value": job_return.return_value}))


# ----------------------------------------------------------------------------- config


def test_objective_defaults_to_val_acc_and_refuses_test_metrics() -> None:
    cfg = task_config(compose_cfg())
    assert cfg.objective == "val/acc"
    check_config(task_config(compose_cfg(["objective=val/loss"])))
    for bad in ("test/acc", "prune/sleeping/matched@1e-05/acc_after"):
        with pytest.raises(ConfigError) as err:
            check_config(task_config(compose_cfg([f"objective={bad}"])))
        assert str(err.value) == (
            f"objective={bad!r} is not allowed; it is measured on the test set, and tuning on "
            "it leaks the test set into the model choice; use a validation metric, e.g. "
            "objective=val/acc (or val/loss with hydra.sweeper.direction=minimize)"
        )


def test_cdi_train_refuses_a_test_objective_in_one_line() -> None:
    tune = ["-m", "hydra/sweeper=optuna_val", "optimizer.lr=choice(0.001,0.01)"]
    preflight(tune)
    with pytest.raises(ConfigError, match=r"^objective='test/acc' is not allowed; it is measured"):
        preflight([*tune, "objective=test/acc"])


def test_optuna_sweeper_config() -> None:
    sweeper = OmegaConf.to_container(compose_cfg(["hydra/sweeper=optuna_val"]).hydra.sweeper)
    assert sweeper["_target_"] == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper["direction"] == "maximize" and sweeper["sampler"]["seed"] == 0
    assert sweeper["params"] == {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))"}


@pytest.mark.parametrize(
    ("override", "values"),
    [
        ("optimizer.lr=interval(1e-4,0.1)", ["0.0001", "0.1"]),
        ("optimizer.lr=tag(log, interval(1e-4, 1e-1))", ["0.0001", "0.1"]),
        ("trainer.max_epochs=int(interval(1,5))", ["1", "5"]),
        ("optimizer=choice(adam,sgd)", ["adam", "sgd"]),
        ("seed=range(0,3)", ["0", "1", "2"]),
        ("seed=0,7", ["0", "7"]),
    ],
)
def test_sweep_values(override: str, values: list[str]) -> None:
    [parsed] = OverridesParser.create().parse_overrides([override])
    assert sweep_values(parsed) == values


def test_preflight_checks_the_search_space_ends() -> None:
    """Each interval's ends are checked before any trial: the default space passes, and a
    range that reaches an impossible value is refused naming it."""
    assert preflight(["-m", "hydra/sweeper=optuna_val"]) == 20  # its trials
    assert preflight(["-m", "hydra/sweeper=optuna_val", "hydra.sweeper.n_trials=3"]) == 3
    with pytest.raises(ConfigError, match=r"^optimizer\.lr=0\.0 is not allowed; use a finite"):
        preflight(["-m", "hydra/sweeper=optuna_val", "optimizer.lr=interval(0,0.1)"])


@pytest.mark.parametrize(("direction", "worst"), [("maximize", -math.inf), ("minimize", math.inf)])
def test_sweep_objective_is_the_validation_metric_and_a_failure_scores_worst(
    direction: str, worst: float
) -> None:
    from cdi_experiments.run.train import sweep_objective

    cfg = compose_cfg(["hydra/sweeper=optuna_val", f"hydra.sweeper.direction={direction}"])
    metrics = {"val/acc": 0.75, "test/acc": 0.5, "val/loss": 0.25}
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_objective(cfg, metrics) == 0.75
        assert sweep_objective(compose_cfg(["objective=val/loss"]), metrics) == 0.25
        assert sweep_objective(cfg, None) == worst  # a failed job: the study goes on
        assert sweep_objective(cfg, {"test/acc": 0.5}) == worst  # not logged (val_size=0)
        HydraConfig.instance().set_config(compose_cfg())  # the basic sweeper: no direction
        assert sweep_objective(cfg, None) is None
    finally:
        HydraConfig.instance().cfg = None


# ----------------------------------------------------------------------------- a real study


def last_epoch_metric(job: Path, key: str) -> float:
    """The last value of ``key`` in a job's metrics.csv (read independently of the CLI)."""
    return float(pd.read_csv(job / "metrics.csv")[key].dropna().iloc[-1])


@pytest.mark.integration
def test_two_trial_study_optimises_validation_accuracy(tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    args = [
        "-m",
        "hydra/sweeper=optuna_val",
        "optimizer.lr=tag(log,interval(0.001,0.03))",
        "hydra.sweeper.n_trials=2",
        "data.limit=500",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "prune=off",
        "+hydra.callbacks.record._target_=test_optuna.RecordReturn",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])
        )
    }
    cli_ok(run_cli(args, cwd=tmp_path, env=env))

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    returned, lrs = [], []
    for job in jobs:
        value = json.loads((job / RETURNED).read_text())["value"]
        val, test = last_epoch_metric(job, "val/acc"), last_epoch_metric(job, "test/acc")
        assert value == pytest.approx(val, abs=1e-7) and not math.isclose(value, test)
        returned.append(value)
        lrs.append(yaml.safe_load((job / ".hydra/config.yaml").read_text())["optimizer"]["lr"])
    assert len(set(lrs)) == 2 and all(0.001 <= lr <= 0.03 for lr in lrs)

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(range(2), key=returned.__getitem__)
    assert result["best_value"] == pytest.approx(returned[best])
    assert result["best_params"] == {"optimizer.lr": lrs[best]}


@pytest.mark.integration
# SQLAlchemy 1.4 (optuna 2.10 needs <2) warns once that optuna uses its pre-2.0 API
@pytest.mark.filterwarnings("ignore:Deprecated API features detected")
def test_stored_study_holds_the_runs_val_metrics_and_a_relaunch_continues_it(
    tmp_path: Path,
) -> None:
    """``hydra.sweeper.storage=sqlite:///...``: the study is readable back with
    ``optuna.load_study``, each trial's value is its run's last ``val/acc`` in metrics.csv; the
    same command again continues the study (``load_if_exists``): with the same sampler seed its
    trials repeat the first launch's parameters and their finished jobs are skipped."""
    import optuna

    sweep, db = tmp_path / "study", tmp_path / "optuna.db"
    args = [
        "-m",
        "hydra/sweeper=optuna_val",
        "optimizer.lr=tag(log,interval(0.001,0.03))",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.study_name=stored",
        "data.limit=500",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "prune=off",
        f"hydra.sweep.dir={sweep}",
    ]
    cli_ok(run_cli(args, cwd=tmp_path))

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    val_by_lr = {
        yaml.safe_load((job / ".hydra/config.yaml").read_text())["optimizer"]["lr"]: (
            last_epoch_metric(job, "val/acc")
        )
        for job in jobs
    }
    assert len(val_by_lr) == 2
    study = optuna.load_study(study_name="stored", storage=f"sqlite:///{db}")
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.params["optimizer.lr"] for t in trials} == set(val_by_lr)
    for t in trials:
        assert t.value == pytest.approx(val_by_lr[t.params["optimizer.lr"]], abs=1e-7)
    assert study.best_value == pytest.approx(max(val_by_lr.values()), abs=1e-7)
    mtimes = {job: (job / "metrics.csv").stat().st_mtime_ns for job in jobs}

    proc = cli_ok(run_cli(args, cwd=tmp_path))
    assert "Using an existing study with name 'stored'" in proc.stdout + proc.stderr
    again = optuna.load_study(study_name="stored", storage=f"sqlite:///{db}").trials
    assert len(again) == 4
    assert [t.params for t in again[2:]] == [t.params for t in trials]
    assert [t.value for t in again[2:]] == [t.value for t in trials]
    now = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert now == jobs  # no new run: the repeated jobs were skipped as finished
    assert {job: (job / "metrics.csv").stat().st_mtime_ns for job in jobs} == mtimes
