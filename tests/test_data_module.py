"""ImageDataModule on the real MNIST / FashionMNIST files: shapes, normalization, split, order.

Properties: the split is a disjoint partition fixed by ``split_seed``; epoch ``e``'s order is a
pure function of ``(seed, e)``; DDP shards are disjoint and equally long; Lightning reaches the
sampler's ``set_epoch`` and does not wrap it. Golden values pin the order's bits.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data.distributed import DistributedSampler

from cdi_experiments import datasets as ds
from cdi_experiments.lightning.datamodule import (
    DATA_ORDER_VERSION,
    NORMALIZATION,
    ImageDataModule,
    ShardedBatchSampler,
    epoch_order,
    split_indices,
)

DATASETS = ("mnist", "fashion_mnist")


@pytest.fixture(scope="module", autouse=True)
def _real_data() -> None:
    """Fetch the real files once if bootstrap has not (no-op when they are there)."""
    for name in DATASETS:
        if not ds.is_ready(name):
            ds.fetch(name)


@pytest.fixture(scope="module", params=DATASETS)
def full(request: pytest.FixtureRequest) -> ImageDataModule:
    dm = ImageDataModule(request.param)
    dm.setup()
    return dm


def _small(**kwargs) -> ImageDataModule:
    dm = ImageDataModule(**{"name": "mnist", "limit": 600, **kwargs})
    dm.setup()
    return dm


def _epoch_batches(dm: ImageDataModule, epoch: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [y for _, y in loader]


# --------------------------------------------------------------------------- contents


def test_shapes_dtypes_and_split_sizes(full: ImageDataModule) -> None:
    assert (len(full.x_train), len(full.x_val), len(full.x_test)) == (55000, 5000, 10000)
    assert full.x_train.shape[1:] == (1, 28, 28) == full.input_shape == full.dims
    assert full.x_train.dtype == torch.float32 and full.y_train.dtype == torch.int64
    assert full.num_classes == 10 and set(full.y_train.unique().tolist()) == set(range(10))
    loader = full.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    assert len(loader) == 860  # ceil(55000 / 64)
    x, y = next(iter(full.val_dataloader()))
    assert x.shape == (1000, 1, 28, 28)
    assert len(full.test_dataloader()) == 10


def test_train_split_is_normalized(full: ImageDataModule) -> None:
    assert abs(float(full.x_train.mean())) < 0.01
    assert abs(float(full.x_train.std()) - 1.0) < 0.01


def test_normalization_constants_match_the_real_training_file() -> None:
    for name in DATASETS:
        images, _ = ds.load_tensors(name, train=True)
        counts = torch.bincount(images.flatten(), minlength=256).double()  # exact, and cheap
        values = torch.arange(256, dtype=torch.float64) / 255
        n = counts.sum()
        mean = float((counts * values).sum() / n)
        std = float(((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt())
        assert (round(mean, 4), round(std, 4)) == NORMALIZATION[name]


def test_served_images_are_the_files_images(full: ImageDataModule) -> None:
    images, targets = ds.load_tensors(full.name, train=True)
    train_idx, val_idx = split_indices(5000, 0)
    mean, std = NORMALIZATION[full.name]
    for k in (0, 1234, 54999):
        expected = (images[train_idx[k]].float() / 255 - mean) / std
        assert torch.allclose(full.x_train[k, 0], expected, atol=1e-6)
        assert full.y_train[k] == targets[train_idx[k]]
    assert torch.equal(full.y_val, targets[val_idx])


def test_unnormalized_and_flattened_variants() -> None:
    raw = _small(normalize=False)
    assert float(raw.x_train.min()) == 0.0 and float(raw.x_train.max()) == 1.0
    flat = _small(flatten=True)
    assert flat.x_train.shape == (600, 784) and flat.input_shape == (784,)
    x, _ = next(iter(flat.train_dataloader()))
    assert x.shape == (64, 784)


def test_limit_caps_every_split() -> None:
    dm = _small(limit=7000)
    assert (len(dm.x_train), len(dm.x_val), len(dm.x_test)) == (7000, 5000, 7000)
    dm = _small(limit=300)
    assert (len(dm.x_train), len(dm.x_val), len(dm.x_test)) == (300, 300, 300)
    full_train, _ = split_indices(5000, 0)
    images, _ = ds.load_tensors("mnist", train=True)
    first = (images[full_train[:300]].float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(dm.x_train[:, 0], first, atol=1e-6)  # the first `limit` of the split


def test_val_size_zero_means_no_validation() -> None:
    dm = _small(val_size=0)
    assert dm.val_dataloader() == []
    assert dm.val_stages == ()


def _labels(loader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


@pytest.mark.parametrize(
    ("val_size", "stages"), [(5000, ("val", "test_epoch")), (0, ("test_epoch",))]
)
def test_test_each_epoch_serves_the_test_set_after_validation(val_size, stages) -> None:
    dm = _small(val_size=val_size, test_each_epoch=True)
    assert dm.val_stages == stages
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == len(stages)
    _, test_targets = ds.load_tensors("mnist", train=False)
    assert torch.equal(_labels(loaders[-1]), test_targets[:600])  # the test subset, in order
    assert torch.equal(_labels(loaders[-1]), _labels(dm.test_dataloader()))
    if val_size:
        assert torch.equal(_labels(loaders[0]), dm.y_val)
    # training data and the resume contract are untouched by the flag
    plain = _small(val_size=val_size)
    assert torch.equal(dm.y_train, plain.y_train) and dm.state_dict() == plain.state_dict()


def test_without_test_each_epoch_val_is_one_loader_as_before() -> None:
    dm = _small()
    assert dm.val_stages == ("val",)
    assert torch.equal(_labels(dm.val_dataloader()), dm.y_val)


def test_test_each_epoch_must_be_a_bool() -> None:
    with pytest.raises(ValueError) as err:
        ImageDataModule("mnist", test_each_epoch="yes")
    assert str(err.value) == "test_each_epoch must be true or false, got 'yes'"


# --------------------------------------------------------------------------- the split


def test_split_is_a_disjoint_partition_fixed_by_split_seed() -> None:
    train, val = split_indices(5000, split_seed=0)
    assert len(train) == 55000 and len(val) == 5000
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60000))
    again_train, again_val = split_indices(5000, split_seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    _, other_val = split_indices(5000, split_seed=1)
    assert not torch.equal(val, other_val)


def test_split_is_the_same_across_datamodule_instances() -> None:
    a, b = _small(split_seed=7), _small(split_seed=7)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_val, b.y_val)
    assert torch.equal(a.x_train, b.x_train)
    c = _small(split_seed=8)
    assert not torch.equal(a.x_val, c.x_val)


def test_order_golden_values() -> None:
    """A change here changes every run's data order: bump DATA_ORDER_VERSION deliberately."""
    assert DATA_ORDER_VERSION == 1
    assert epoch_order(20, seed=0, epoch=0).tolist() == [
        2, 14, 12, 7, 19, 6, 1, 18, 13, 9, 11, 17, 5, 8, 15, 10, 3, 16, 4, 0,
    ]  # fmt: skip
    assert split_indices(5000, 0)[1][:5].tolist() == [2, 4, 5, 24, 42]


# --------------------------------------------------------------------------- epoch order


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = _small(seed=3), _small(seed=3)
    epoch3 = _epoch_batches(a, 3)
    _epoch_batches(b, 0)  # b's history must not matter
    assert all(torch.equal(p, q) for p, q in zip(epoch3, _epoch_batches(b, 3), strict=True))
    assert not torch.equal(torch.cat(epoch3), torch.cat(_epoch_batches(a, 4)))
    assert not torch.equal(torch.cat(epoch3), torch.cat(_epoch_batches(_small(seed=4), 3)))


def test_an_epoch_serves_every_training_sample_once() -> None:
    dm = _small()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    idx = torch.cat(list(loader.sampler))
    assert torch.equal(idx, epoch_order(600, dm.seed, 2))
    assert torch.equal(idx.sort().values, torch.arange(600))
    assert [len(b) for b in loader.sampler] == [64] * 9 + [24]


def test_order_is_drawn_lazily_at_the_first_batch() -> None:
    """Lightning creates the loader's iterator before calling set_epoch() on resume."""
    dm = _small()
    loader = dm.train_dataloader()
    batches = iter(loader)
    loader.sampler.set_epoch(3)
    assert torch.equal(next(batches)[1], dm.y_train[epoch_order(600, dm.seed, 3)[:64]])


def test_train_loader_starts_at_the_trainers_epoch() -> None:
    dm = _small()
    progress = SimpleNamespace(current=SimpleNamespace(processed=4))
    dm.trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_progress=progress))
    loader = dm.train_dataloader()
    assert loader.sampler.epoch == 4


def test_lightning_reaches_set_epoch_and_does_not_wrap_the_sampler() -> None:
    dm = _small()
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 5)  # what Lightning's fit loop calls at every epoch start
    assert loader.sampler.epoch == 5
    # Lightning injects its own DistributedSampler unless the sampler already is one.
    assert isinstance(loader.sampler, DistributedSampler)


def test_lightning_ddp_trainer_leaves_the_loader_alone() -> None:
    from pytorch_lightning import Trainer
    from pytorch_lightning.trainer.states import RunningStage

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer._accelerator_connector.is_distributed
    loader = _small().train_dataloader()
    prepared = trainer._data_connector._prepare_dataloader(loader, True, RunningStage.TRAINING)
    assert prepared is loader


def test_fit_serves_each_epoch_in_its_order() -> None:
    import pytorch_lightning as pl

    from cdi_experiments.lightning.classifier import Classifier

    dm = ImageDataModule("mnist", limit=128, batch_size=64, seed=11)
    seen: list[torch.Tensor] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[1].clone())

    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Record()],
    )
    trainer.fit(Classifier(model_cfg={"_target_": "cdi_experiments.models.MLP"}), datamodule=dm)
    for epoch in (0, 1):
        expected = dm.y_train[epoch_order(128, 11, epoch)]
        assert torch.equal(torch.cat(seen[2 * epoch : 2 * epoch + 2]), expected)


# --------------------------------------------------------------------------- DDP shards


@pytest.mark.parametrize("limit", [600, 601])
def test_ddp_shards_are_disjoint_and_equal(limit: int) -> None:
    dm = _small(limit=limit)
    shards, batches = [], []
    for rank in range(2):
        dm.num_replicas, dm.rank = 2, rank  # what setup() reads from trainer.world_size/global_rank
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        shards.append(torch.cat(list(loader.sampler)))
        batches.append(len(loader))
    assert len(shards[0]) == len(shards[1]) == limit // 2
    assert batches[0] == batches[1]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    union = torch.cat(shards)
    perm = epoch_order(limit, dm.seed, 1)
    assert torch.equal(union, perm[: len(union)])  # the permutation, remainder dropped


def test_ddp_eval_shards_cover_every_sample_once_in_order() -> None:
    dm = _small(limit=601)
    pieces = []
    for rank in range(2):
        dm.num_replicas, dm.rank = 2, rank
        pieces.append(torch.cat(list(dm.test_dataloader().sampler)))
    assert torch.equal(torch.cat(pieces), torch.arange(601))


def test_sampler_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, 2, shuffle=True, num_replicas=2, rank=2)


# --------------------------------------------------------------------------- helpers, state


def test_sample_batch_is_the_first_training_images() -> None:
    a, b = _small(), _small()
    assert torch.equal(a.sample_batch(32), a.x_train[:32])
    assert torch.equal(a.sample_batch(32), b.sample_batch(32))
    with pytest.raises(ValueError, match="n="):
        a.sample_batch(601)


def test_workers_serve_the_same_batches() -> None:
    dm0, dm1 = _small(), _small(num_workers=1)
    for p, q in zip(dm0.train_dataloader(), dm1.train_dataloader(), strict=True):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])


def test_state_dict_refuses_a_different_data_stream() -> None:
    dm = _small()
    state = dm.state_dict()
    _small().load_state_dict(state)  # same config: fine
    with pytest.raises(ValueError, match="split_seed"):
        _small(split_seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ImageDataModule("mnist", limit=600, seed=5).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "cifar10"}, "name"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": -1}, "eval_batch_size"),
        ({"val_size": 60000}, "val_size"),
        ({"val_size": -1}, "val_size"),
        ({"limit": 0}, "limit"),
        ({"num_workers": -1}, "num_workers"),
        ({"batch_size": 1.5}, "batch_size"),
    ],
)
def test_bad_values_raise_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key) as info:
        ImageDataModule(**{"name": "mnist", **kwargs})
    assert "use" in str(info.value) or "must be" in str(info.value)
