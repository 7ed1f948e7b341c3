"""The real ``configs/``: every option of every group composes and passes ``check_config``;
a bad command line is one ``cdi-train: error:`` line and exit status 2, before anything is
written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import CONFIG_DIR, compose_cfg, run_cli
from omegaconf import OmegaConf

from cdi_experiments.run import train as T
from cdi_experiments.run.schema import GROUPS, ConfigError, check_config

OPTIONS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in GROUPS}
GROUP_OPTIONS = [(g, o) for g in GROUPS for o in OPTIONS[g]]
LAUNCHERS = {
    "basic": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}
ERR = "cdi-train: error: "


def test_every_group_has_options() -> None:
    # The groups check_group_overrides knows are exactly the folders of configs/.
    folders = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    assert folders == set(GROUPS)
    assert all(OPTIONS[g] for g in GROUPS)
    assert len(OPTIONS["init"]) == 18


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS]
)
def test_option_composes_and_checks(group: str, option: str) -> None:
    cfg = compose_cfg([f"{group}={option}"])
    task = T.task_config(cfg)
    check_config(task)
    OmegaConf.to_container(task, resolve=True)  # every interpolation resolves
    assert "hydra" not in task and "hydra" in cfg
    choice = cfg.hydra.runtime.choices
    if group != "launcher":
        assert choice[group] == option
    own = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    if group in ("data", "model"):
        assert task[group].name == option
    elif group == "init":
        assert task.init.scheme == own.scheme and task.init.overrides == own.overrides
        T.build_callback(task, None)  # the callback's own constructor checks pass too
    elif group in ("tracking", "prune", "optimizer", "trainer"):
        assert OmegaConf.to_container(task[group]) == OmegaConf.to_container(own)
    elif group == "logger":
        assert set(task.logger) == set(own)
    elif group == "launcher":
        assert choice["hydra/launcher"] == {"slurm": "submitit_slurm"}.get(option, option)
        assert cfg.hydra.launcher._target_ == LAUNCHERS[option]
    elif group == "experiment":
        for key in ("data", "model", "init"):  # its `override /group:` defaults took effect
            wanted = next(
                (d[f"override /{key}"] for d in own.get("defaults", []) if f"override /{key}" in d),
                None,
            )
            if wanted is not None:
                assert choice[key] == wanted


def test_models_data_and_optimizers_build() -> None:
    for model in OPTIONS["model"]:
        for opt in OPTIONS["optimizer"]:
            lit = T.build_lit_module(
                T.task_config(compose_cfg([f"model={model}", f"optimizer={opt}"]))
            )
            assert lit.hparams["optimizer"]["name"] == opt
    for data in OPTIONS["data"]:
        dm = T.build_datamodule(T.task_config(compose_cfg([f"data={data}"])))
        assert dm.name == data


def test_slurm_launcher_config() -> None:
    cfg = compose_cfg(
        ["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=/x/sweep"]
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == LAUNCHERS["slurm"]
    assert launcher["partition"] == "gpu"
    assert launcher["timeout_min"] == 240 and launcher["gpus_per_node"] == 1
    assert launcher["submitit_folder"] == "/x/sweep/.submitit/%j"


def test_train_refuses_a_bad_config_before_writing(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("data.batch_size=0")
    with pytest.raises(ConfigError, match=r"^data\.batch_size=0 is not allowed"):
        T.train(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- command line

BAD = {
    "init=hee": "init='hee' is not a config option; choose one of: " + ", ".join(OPTIONS["init"]),
    "data=cifar": "data='cifar' is not a config option; choose one of: fashion_mnist, mnist",
    "data.batch_size=0": "data.batch_size=0 is not allowed; use an integer >= 1",
    "tracking.thresholds=[-1]": "tracking.thresholds[0]=-1 is not allowed; use a number >= 0.0",
    "optimizer.name=rmsprop": "optimizer.name='rmsprop' is not allowed; choose one of: adam, adamw, sgd",
    "prune.sparsities=[1.5]": (
        "prune.sparsities[0]=1.5 is not allowed; use fractions in (0, 1), e.g. [0.5, 0.9]"
    ),
    "model.name=resnet": (
        "model.name='resnet' is not allowed; choose one of: mlp, mlp_dropout, cnn, attention"
    ),
    "logger=wandb logger.wandb.mode=cloud": (
        "logger.wandb.mode='cloud' is not allowed; choose one of: offline, online, disabled"
    ),
    "logger.wandb.mode=cloud": (  # not a key of logger=csv: Hydra's own message, on one line
        "Could not override 'logger.wandb.mode'. To append to your config use "
        "+logger.wandb.mode=cloud"
    ),
    "seed=-1": "seed=-1 is not allowed; use an integer >= 0",
    "trainer=fsdp trainer.accelerator=cpu": (
        "trainer.accelerator='cpu' is not allowed; Lightning runs strategy 'fsdp' on GPUs "
        "only: use trainer.accelerator=gpu, or trainer=ddp on CPU"
    ),
    "+extra_callbacks.x=3": (
        "extra_callbacks.x=3 is not allowed; use {_target_: module.Class, ...}, e.g. "
        "+extra_callbacks.x._target_=cdi_experiments.run.train.RankInitFingerprint"
    ),
    # A sweep is checked job by job before the first one starts.
    "-m init=zeros,hee": (
        "init='hee' is not a config option; choose one of: " + ", ".join(OPTIONS["init"])
    ),
    "-m data.batch_size=64,0": "data.batch_size=0 is not allowed; use an integer >= 1",
}


@pytest.mark.parametrize("args", list(BAD))
def test_bad_command_line_is_one_line(
    args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    argv = [*args.split(), f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={sweep_dir}"]
    monkeypatch.setattr(sys, "argv", ["cdi-train", *argv])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        T.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [ERR + BAD[args]]
    assert sorted(tmp_path.iterdir()) == []  # no run dir, no sweep dir, no outputs/


@pytest.mark.parametrize("args", ["init=hee", "data.batch_size=0"])
def test_bad_command_line_cli(args: str, tmp_path: Path) -> None:
    proc = run_cli([args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [ERR + BAD[args]]
    assert proc.stdout == ""
    assert sorted(tmp_path.iterdir()) == []


def test_preflight_counts_sweep_jobs() -> None:
    assert T.preflight(["-m", "init=zeros,he", "data=mnist,fashion_mnist", "seed=1"]) == 4
    assert T.preflight(["experiment=quick"]) == 1
    assert T.preflight(["--cfg", "job"]) == 0  # other Hydra flags: left to Hydra
