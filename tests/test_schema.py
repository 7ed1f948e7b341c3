"""Bad command lines end in one ``cdi-train: error:`` line naming the key, the value and what is
allowed, with exit status 2, before anything is written (no run or sweep directory). Run
in-process through the command line's own ``main``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg, run_cli

from cdi_experiments.cli.train import main
from cdi_experiments.run.schema import ConfigError, check_config, target_signature, task_config

ERR = "cdi-train: error: "
INIT_OPTIONS = (
    "constant, custom, he, he_uniform, keras_default, lecun, lecun_uniform, lsuv, "
    "normal_fan_in, ones, orthogonal, partial, record, torch_default, uniform, uniform_fan_in, xavier, "
    "xavier_uniform, zeros"
)

# command line -> the exact error line after "cdi-train: error: " (a prefix of it, ending "...")
BAD = {
    "tracking.thresholds=[0,inf]": (
        "tracking.thresholds[1]=inf is not allowed; use a finite number >= 0"
    ),
    "prune.threshold=inf": "prune.threshold=inf is not allowed; use a finite number >= 0",
    "seed=-1": "seed=-1 is not allowed; use an integer with 0 <= seed < 2**64 (0 is a seed)",
    "seed=18446744073709551616": "seed=18446744073709551616 is not allowed; use an integer with",
    "init=constant init.params.value=abc": (
        "init.params.value='abc' is not allowed; init scheme 'constant' needs a finite number"
    ),
    "init=uniform init.params.low=2 init.params.high=1": (
        "init.params={'low': 2, 'high': 1} is not allowed; init scheme 'uniform' needs "
        "low < high, got low=2.0, high=1.0"
    ),
    "init=orthogonal init.params.gain=nan": (
        "init.params.gain=nan is not allowed; init scheme 'orthogonal' needs a finite number"
    ),
    "init=custom init.params.std=-1": (
        "init.params={'std': -1} is not allowed; init scheme 'custom': std must be >= 0, got -1.0"
    ),
    "init.scheme=hee": "init.scheme='hee' is not allowed; choose one of: ",
    "init.sceme=he": "init.sceme='he' is not allowed: no such key; did you mean init.scheme?",
    "+init.sceme=he": "init.sceme='he' is not allowed: no such key; did you mean init.scheme?",
    "tracking.quantiles=[2.0]": (
        "tracking.quantiles[0]=2.0 is not allowed; use a finite number >= 0 and <= 1"
    ),
    "data.val_size=70000": (
        "data.val_size=70000 is not allowed; use an integer >= 0 and < 60000 (the training "
        "file's images; the rest are trained on)"
    ),
    "data.batch_size=0": "data.batch_size=0 is not allowed; use an integer >= 1",
    "trainer.devices=0": (
        "trainer.devices=0 is not allowed; use an integer >= 1, a list of device indices, "
        "-1 or 'auto'"
    ),
    "trainer.accelerator=tpu": (
        "trainer.accelerator='tpu' is not allowed; choose one of: auto, cpu, cuda, gpu, mps"
    ),
    "+trainer.max_epoch=2": (
        "trainer.max_epoch=2 is not allowed: pytorch_lightning.Trainer takes no argument "
        "'max_epoch'; did you mean trainer.max_epochs? its arguments are: accelerator, "
    ),
    "trainer.max_epoch=2": (
        "trainer.max_epoch=2 is not allowed: pytorch_lightning.Trainer takes no argument "
        "'max_epoch'; did you mean trainer.max_epochs?"
    ),
    "trainer=fsdp trainer.accelerator=cpu": (
        "trainer.accelerator='cpu' is not allowed; Lightning runs strategy 'fsdp' on GPUs "
        "only: use trainer.accelerator=gpu, or trainer=ddp on CPU"
    ),
    "optimizer.lr=inf": "optimizer.lr=inf is not allowed; use a finite number > 0",
    "optimizer.betas=[0.9,1.5]": "optimizer.betas[1]=1.5 is not allowed; use a number in [0, 1)",
    "prune.sparsities=[1.5]": (
        "prune.sparsities[0]=1.5 is not allowed; use fractions in (0, 1), e.g. [0.5, 0.9]"
    ),
    "prune.criteria=[sleping]": "prune.criteria[0]='sleping' is not allowed; choose one of: ",
    "init=hee": "init='hee' is not a config option; choose one of: " + INIT_OPTIONS,
    "model=nonexistent": (
        "model='nonexistent' is not a config option; choose one of: attention, cnn, custom, "
        "mlp, mlp_dropout"
    ),
    "model=custom": (
        "model._target_='???' is not allowed; model=custom needs the class to build, e.g. "
        "model._target_=mypkg.nets.TinyNet"
    ),
    "model=custom model._target_=no.such.Class": (
        "cannot import 'no.such.Class': no module named 'no'; give a module.Class that Python "
        "can import (installed, or its folder on PYTHONPATH)"
    ),
    "+model.hiden=[3]": (
        "model.hiden=[3] is not allowed: cdi_experiments.models.MLP takes no argument 'hiden'; "
        "did you mean model.hidden? its arguments are: input_shape, num_classes, hidden, dropout"
    ),
    "optimizer=custom optimizer._target_=torch.optim.RMSprop +optimizer.lrr=1": (
        "optimizer.lrr=1 is not allowed: torch.optim.RMSprop takes no argument 'lrr'; "
        "did you mean optimizer.lr?"
    ),
    "+callbacks.es._target_=pytorch_lightning.callbacks.EarlyStopping +callbacks.es.monitr=x": (
        "callbacks.es.monitr='x' is not allowed: pytorch_lightning.callbacks.EarlyStopping "
        "takes no argument 'monitr'; did you mean callbacks.es.monitor?"
    ),
    "logger.wandb.mode=cloud": (
        "logger.wandb.mode=cloud is not allowed: logger has no key 'wandb'; add a new argument "
        "with +logger.wandb.mode=cloud"
    ),
    "+logger.c._target_=pytorch_lightning.loggers.CometLogger": (
        "logger.c._target_='pytorch_lightning.loggers.CometLogger' needs the package "
        "'comet_ml', which is not installed; pip install comet-ml"
    ),
    "seed=abc": "Error merging override seed=abc: Value 'abc' of type 'str' could not be",
    # A run name is one folder inside the output root: it cannot lead out of it.
    "run_name=../../etc": (
        "run_name='../../etc' is not allowed; a run name is one folder name inside the output "
        "root, without '/', '\\' or '..' (e.g. run_name=mlp-mnist-he-s0); to write elsewhere "
        "set hydra.run.dir"
    ),
    "run_name=/tmp/elsewhere": "run_name='/tmp/elsewhere' is not allowed; a run name is one",
    # A sweep: every job is checked before job 0 starts.
    "-m seed=0,-5": "seed=-5 is not allowed; use an integer with 0 <= seed < 2**64",
    "-m init=zeros,hee": "init='hee' is not a config option; choose one of: " + INIT_OPTIONS,
    "-m data.batch_size=64,0": "data.batch_size=0 is not allowed; use an integer >= 1",
    # A sweep job's directory is named after its overrides: no '..' can lead out of the sweep.
    "-m seed=0,1 data.root=../../../../tmp/x": (
        "data.root=../../../../tmp/x: a sweep job's directory is named after its overrides, "
        "and this '..' would put the job's files outside the sweep directory"
    ),
}


@pytest.mark.parametrize("args", list(BAD))
def test_bad_command_line_is_one_line(
    args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [*args.split(), f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 's'}"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(ERR + BAD[args]), line
    assert sorted(tmp_path.iterdir()) == []  # no run dir, no sweep dir, no outputs/


@pytest.mark.integration
def test_bad_command_line_from_the_shell(tmp_path: Path) -> None:
    proc = run_cli(["-m", "seed=0,-5"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [ERR + BAD["-m seed=0,-5"] + " (0 is a seed)"]
    assert proc.stdout == "" and sorted(tmp_path.iterdir()) == []


def test_check_config_names_the_key_in_library_use() -> None:
    cfg = task_config(compose_cfg(["data.limit=0"]))
    with pytest.raises(ConfigError, match=r"^data\.limit=0 is not allowed; use an integer >= 1"):
        check_config(cfg)


def test_trainer_signature_is_read_without_importing_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from cdi_experiments.run.schema import target_signature as t; "
        "s = t('pytorch_lightning.Trainer'); w = t('pytorch_lightning.loggers.WandbLogger'); "
        "print('max_epochs' in s.names, w.var_keyword, 'pytorch_lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False"]
    assert "lr" in target_signature("torch.optim.Adam").names
