"""The real ``configs/``: every option of every group composes, passes the schema and builds
what it names; group files hold differences only.
"""

from __future__ import annotations

import pytest
from conftest import CONFIG_DIR, compose_cfg
from omegaconf import OmegaConf

from cdi_experiments.generator import schemes
from cdi_experiments.run import build
from cdi_experiments.run.preflight import preflight, sweep_jobs
from cdi_experiments.run.schema import GROUPS, ConfigError, check_config, task_config

OPTIONS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in GROUPS}
GROUP_OPTIONS = [(g, o) for g in GROUPS for o in OPTIONS[g] if o != "custom"]
LAUNCHERS = {
    "basic": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


def test_every_group_has_options() -> None:
    folders = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert folders - {"hydra"} == set(GROUPS)
    assert all(OPTIONS[g] for g in GROUPS)
    # one option per registered scheme, plus LSUV and the two that are not schemes
    assert set(OPTIONS["init"]) == {*schemes.names(), "lsuv", "partial", "record"}


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS]
)
def test_option_composes_and_checks(group: str, option: str) -> None:
    cfg = compose_cfg([f"{group}={option}"])
    task = task_config(cfg)
    check_config(task)
    OmegaConf.to_container(task, resolve=True)  # every interpolation resolves
    assert "hydra" not in task and "hydra" in cfg
    choice = cfg.hydra.runtime.choices
    if group == "launcher":
        assert choice["hydra/launcher"] == {"slurm": "submitit_slurm"}.get(option, option)
        assert cfg.hydra.launcher._target_ == LAUNCHERS[option]
    else:
        assert choice[group] == option


@pytest.mark.parametrize("group", ["init", "tracking", "prune"])
def test_fixed_shape_groups_hold_only_differences(group: str) -> None:
    # A group file sets only what differs from the schema's defaults (the structured config).
    base = OmegaConf.to_container(compose_cfg([], hydra_node=False)[group])
    defaults = {
        "init": {**base, "scheme": "he"},
        "tracking": base,
        "prune": base,
    }[group]
    for option in OPTIONS[group]:
        own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
        assert all(own[k] != defaults[k] for k in own if k != "scheme"), (group, option, own)


def test_trainer_options_differ_from_the_default_in_a_few_lines() -> None:
    default = OmegaConf.to_container(compose_cfg(["trainer=cpu"], hydra_node=False).trainer)
    assert default["_target_"] == "pytorch_lightning.Trainer"
    for option in (o for o in OPTIONS["trainer"] if o != "default"):
        own = OmegaConf.load(CONFIG_DIR / "trainer" / f"{option}.yaml")
        assert len([k for k in own if k != "defaults"]) <= 3, option
        composed = compose_cfg([f"trainer={option}"], hydra_node=False).trainer
        assert composed.deterministic is True  # one determinism switch, never overridden


def test_every_model_and_optimizer_builds() -> None:
    dm = build.build_datamodule(task_config(compose_cfg([])))
    for model in (o for o in OPTIONS["model"] if o != "custom"):
        for opt in (o for o in OPTIONS["optimizer"] if o != "custom"):
            cfg = task_config(compose_cfg([f"model={model}", f"optimizer={opt}"]))
            lit = build.build_lit_module(cfg, dm)
            hp = lit.hparams
            assert hp["optimizer"] == OmegaConf.to_container(cfg.optimizer)
            assert hp["model_cfg"]["_target_"] == cfg.model._target_
            assert hp["model_cfg"]["input_shape"] == [1, 28, 28]  # from the datamodule
            optimizer = lit.configure_optimizers()
            assert type(optimizer).__name__ == cfg.optimizer._target_.rsplit(".", 1)[1]
    for data in OPTIONS["data"]:
        dm = build.build_datamodule(task_config(compose_cfg([f"data={data}", "seed=7"])))
        assert dm.name == data and dm.seed == 7


def test_callbacks_and_loggers_build(tmp_path) -> None:
    from cdi_experiments.lightning.callback import DeterministicInitCallback
    from cdi_experiments.paths import RunPaths

    cfg = task_config(compose_cfg(["init=orthogonal", "tracking.every_n_epochs=2"]))
    callbacks = build.build_callbacks(cfg, RunPaths(tmp_path))
    names = [type(c).__name__ for c in callbacks]
    assert names == ["DeterministicInitCallback", "RngState", "EpochEndRow", "ModelCheckpoint"]
    init = build.init_callback(callbacks)
    assert isinstance(init, DeterministicInitCallback)
    assert (init.scheme, init.params, init.every_n_epochs) == ("orthogonal", {"gain": 1.0}, 2)
    assert callbacks[3].dirpath == str(tmp_path / "checkpoints")
    cfg = task_config(compose_cfg(["logger=many"]))
    loggers = build.build_loggers(cfg, RunPaths(tmp_path), init, {})
    assert [type(lg).__name__ for lg in loggers] == [
        "ResumableCSVLogger",
        "TensorBoardLogger",
        "WandbLogger",
    ]
    assert init.extra_state["wandb_run_id"] == loggers[2]._id


def test_slurm_launcher_config() -> None:
    cfg = compose_cfg(
        ["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=/x/sweep"]
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == LAUNCHERS["slurm"]
    assert launcher["partition"] == "gpu"
    assert launcher["timeout_min"] == 240 and launcher["gpus_per_node"] == 1
    assert launcher["submitit_folder"] == "/x/sweep/.submitit/%j"


def test_preflight_counts_sweep_jobs() -> None:
    assert preflight(["-m", "init=zeros,he", "data=mnist,fashion_mnist", "seed=1"]) == 4
    assert preflight(["-m", "seed=range(0,3)", "init=he,zeros"]) == 6
    assert preflight(["experiment=quick"]) == 1
    assert preflight(["--cfg", "job"]) == 0  # other Hydra flags: left to Hydra
    with pytest.raises(ConfigError, match=r"^seed=-5 is not allowed"):
        preflight(["-m", "seed=0,1,-5"])


def test_sweep_jobs_include_the_sweeper_params() -> None:
    from hydra import initialize_config_module

    with initialize_config_module(config_module="cdi_experiments.configs", version_base="1.3"):
        jobs = sweep_jobs(["seed=0,1", "data.limit=9"], {"init": "he,zeros", "seed": "5"})
    # Hydra's basic sweeper order: the last override varies fastest; the command line wins.
    assert jobs == [
        ["init=he", "seed=0", "data.limit=9"],
        ["init=he", "seed=1", "data.limit=9"],
        ["init=zeros", "seed=0", "data.limit=9"],
        ["init=zeros", "seed=1", "data.limit=9"],
    ]
