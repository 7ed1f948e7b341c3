"""Models and the Lightning Classifier on real MNIST.

The fit fixture trains the ``mlp`` for one epoch on 2000 real images and is shared by the
tests that read its metrics, checkpoint and evaluation.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from cdi_experiments import datasets as ds
from cdi_experiments.lightning.classifier import Classifier, optimizer_factory
from cdi_experiments.lightning.datamodule import ImageDataModule
from cdi_experiments.models import CNN, MLP, RowAttention
from cdi_experiments.modules import init_module
from cdi_experiments.run.schema import config_dir

MODEL_DIR = Path(config_dir()) / "model"
MODELS = ("mlp", "mlp_dropout", "cnn", "attention")


def build_model(name: str, **kwargs) -> torch.nn.Module:
    """The model ``configs/model/<name>.yaml`` describes, as ``cdi-train model=<name>`` builds it."""
    spec = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml"))
    return instantiate({**spec, **kwargs}, _convert_="all")


METRIC_KEYS = {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"}


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "default_root_dir": root,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def mnist() -> ImageDataModule:
    if not ds.is_ready("mnist"):
        ds.fetch("mnist")
    dm = ImageDataModule("mnist", limit=2000)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def fitted(mnist: ImageDataModule, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    module = Classifier(
        model_cfg={"_target_": "cdi_experiments.models.MLP"},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
    )
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", monitor="val/acc", mode="max")
    trainer = _trainer(root, logger=CSVLogger(root, name="csv"), callbacks=[ckpt])
    trainer.fit(module, datamodule=mnist)
    test = trainer.test(module, datamodule=mnist, verbose=False)[0]
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    return {"module": module, "trainer": trainer, "test": test, "rows": rows, "ckpt": ckpt}


def _logged(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key)]
    assert len(values) == 1, f"{key} logged {len(values)} times"
    return values[0]


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["mlp", "mlp_dropout", "cnn", "attention"])
def test_every_model_classifies_a_real_batch(name: str, mnist: ImageDataModule) -> None:
    model = build_model(name)
    x = mnist.sample_batch(16)
    out = model(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    rebuilt = build_model(name)  # the config rebuilds the same architecture
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [
        (n, p.shape) for n, p in model.named_parameters()
    ]


def test_parameter_names_are_the_documented_ones() -> None:
    shapes = {
        "mlp": {"fc1.weight": (128, 784), "fc2.weight": (64, 128), "fc3.weight": (10, 64)},
        "mlp_dropout": {"fc1.weight": (256, 784), "fc2.weight": (128, 256), "fc3.bias": (10,)},
        "cnn": {
            "conv1.weight": (8, 1, 3, 3),
            "conv2.weight": (16, 8, 3, 3),
            "fc1.weight": (10, 784),
        },
        "attention": {
            "embed.weight": (32, 28),
            "pos.weight": (28, 32),
            "attn.in_proj_weight": (96, 32),
            "attn.out_proj.weight": (32, 32),
            "norm.weight": (32,),
            "head.weight": (10, 32),
        },
    }
    options = sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if p.stem != "custom")
    assert options == sorted(shapes) == sorted(MODELS)
    for name, expected in shapes.items():
        params = {n: tuple(p.shape) for n, p in build_model(name).named_parameters()}
        assert {n: params.get(n) for n in expected} == expected, name


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("mlp_dropout")
    x = torch.randn(8, 1, 28, 28)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    assert not any(isinstance(m, torch.nn.Dropout) for m in build_model("mlp").modules())


def test_deterministic_init_covers_every_parameter(mnist: ImageDataModule) -> None:
    for name in MODELS:
        model = build_model(name)
        plan = init_module(model, seed=0, scheme="he")
        assert set(plan.blocks) == {n for n, _ in model.named_parameters()}, name
    plan = init_module(build_model("attention"), seed=0, scheme="he")
    assert len(plan.blocks["attn.in_proj_weight"]) == 3  # Q, K, V
    model = build_model("cnn")
    init_module(model, seed=0, scheme="lsuv", lsuv_batch=mnist.sample_batch(64))
    assert torch.isfinite(model(mnist.sample_batch(8))).all()


def test_model_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="num_heads=5 must divide d_model=32"):
        RowAttention(num_heads=5)
    with pytest.raises(ValueError, match=r"dropout=1\.0 is out of range"):
        MLP(dropout=1.0)
    with pytest.raises(
        ValueError, match=r"input_shape=\[784\] must be \(channels, height, width\)"
    ):
        CNN(input_shape=[784])
    with pytest.raises(ValueError, match="hidden must be a list of positive integers"):
        MLP(hidden=5)


# --------------------------------------------------------------------------- optimizer config


def test_optimizer_config_is_a_partial_of_the_parameters() -> None:
    params = list(MLP().parameters())
    sgd = optimizer_factory({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9})(params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adamw = optimizer_factory(
        OmegaConf.create({"_target_": "torch.optim.AdamW", "betas": [0.8, 0.9]})
    )(params)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.8, 0.9)  # plain values, not an OmegaConf ListConfig
    default = optimizer_factory(None)(params)
    assert isinstance(default, torch.optim.Adam) and default.defaults["lr"] == 1e-3


def test_hparams_are_plain_containers_even_from_omegaconf() -> None:
    module = Classifier(
        model_cfg=OmegaConf.create({"_target_": "cdi_experiments.models.MLP", "hidden": [32, 16]}),
        optimizer=OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.05}),
        scheduler=OmegaConf.create(
            {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 1, "gamma": 0.5}
        ),
    )
    hp = dict(module.hparams)
    assert type(hp["model_cfg"]) is dict and type(hp["model_cfg"]["hidden"]) is list
    assert hp["model_cfg"]["hidden"] == [32, 16] and hp["optimizer"]["lr"] == 0.05
    assert module.model.fc1.out_features == 32
    configured = module.configure_optimizers()
    assert isinstance(configured["lr_scheduler"], torch.optim.lr_scheduler.StepLR)
    assert configured["optimizer"].defaults["lr"] == 0.05


def test_classifier_requires_a_model() -> None:
    with pytest.raises(ValueError, match="model_cfg"):
        Classifier()


# --------------------------------------------------------------------------- Lightning fit


def test_one_epoch_learns_and_logs_every_key(fitted: dict) -> None:
    rows = fitted["rows"]
    logged = {k for r in rows for k, v in r.items() if v}
    assert METRIC_KEYS <= logged
    assert _logged(rows, "val/acc") > 0.7
    assert _logged(rows, "train/loss") > _logged(rows, "val/loss")  # the epoch mean vs the end


def test_epoch_accuracy_is_exact(fitted: dict, mnist: ImageDataModule) -> None:
    val_acc = _logged(fitted["rows"], "val/acc")
    assert abs(val_acc * 2000 - round(val_acc * 2000)) < 1e-6  # correct / 2000, not a mean of means
    assert val_acc == pytest.approx(
        fitted["module"].evaluate(mnist.val_dataloader())["acc"], abs=1e-9
    )


def test_evaluate_equals_trainer_test(fitted: dict, mnist: ImageDataModule) -> None:
    module = fitted["module"]
    module.train()
    result = module.evaluate(mnist.test_dataloader())
    assert module.training  # evaluate() restores the mode
    assert result["count"] == 2000
    assert abs(result["acc"] - fitted["test"]["test/acc"]) < 1e-6
    assert abs(result["loss"] - fitted["test"]["test/loss"]) < 1e-6
    assert result["acc"] * 2000 == round(result["acc"] * 2000)


def test_checkpoint_loads_weights_only_and_rebuilds(fitted: dict, mnist: ImageDataModule) -> None:
    path = fitted["ckpt"].best_model_path
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["model_cfg"]["_target_"] == "cdi_experiments.models.MLP"
    assert checkpoint["cdi"]["torch_version"] == str(torch.__version__)
    assert checkpoint["ImageDataModule"]["split_seed"] == 0
    restored = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    for (name, p), q in zip(
        fitted["module"].state_dict().items(), restored.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    assert restored.evaluate(mnist.test_dataloader()) == fitted["module"].evaluate(
        mnist.test_dataloader()
    )


def test_resume_from_epoch_end_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def fresh() -> tuple[Classifier, ImageDataModule]:
        torch.manual_seed(1)
        return Classifier(MLP(hidden=[32])), ImageDataModule("mnist", limit=256)

    module, dm = fresh()
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=False).fit(
        module, datamodule=dm
    )
    first, dm1 = fresh()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[ckpt]).fit(
        first, datamodule=dm1
    )
    resumed, dm2 = fresh()
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=False).fit(
        resumed, datamodule=dm2, ckpt_path=ckpt.last_model_path
    )
    for p, q in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
