"""MNIST / FashionMNIST as a LightningDataModule that serves whole batches from memory.

The raw files are decoded once through torchvision (:func:`cdi_experiments.datasets.load_tensors`)
and converted to normalized float32 ``(N, 1, 28, 28)`` tensors. A :class:`ShardedBatchSampler`
yields one index tensor per batch and :class:`TensorBatchDataset` answers it with
``(x[idx], y[idx])``; the DataLoader runs with ``batch_size=None``, so there is no per-sample
PIL conversion and no per-sample collate on the hot path.

Order contract (``DATA_ORDER_VERSION = 1``)::

    split:        perm = randperm(60000, Generator().manual_seed(fold(split_seed, SPLIT_STREAM)))
                  val = sorted(perm[:val_size]),  train = sorted(perm[val_size:])
    epoch order:  randperm(n_train, Generator().manual_seed(fold(seed, ORDER_STREAM, epoch)))
    rank shard:   order[rank * m : (rank + 1) * m],  m = n_train // world_size

``fold`` is the generator's SplitMix64 key derivation (:func:`cdi_experiments.generator.bits.fold`),
so the order is a pure function of ``(seed, epoch)``, independent of Python's ``hash`` and of how
many epochs ran before: a run resumed from an epoch-end checkpoint sees exactly the batches an
uninterrupted run would (tested bit for bit). Lightning calls the sampler's ``set_epoch`` at
every epoch start; the training loader also starts at the trainer's epoch and draws the order
only at its first batch, because on resume Lightning creates the iterator before ``set_epoch``.
Mid-epoch resume is not exact: the loader keeps no position within an epoch.
``torch.randperm`` is part of the contract; the golden-value tests in
``tests/test_data_module.py`` fail if a torch upgrade changes it.

Distributed training: the module shards the training order itself (equal-length shards, the
remainder of the permutation dropped, so every rank runs the same number of batches) and splits
val/test into contiguous, disjoint, in-order pieces. Use ``Trainer(use_distributed_sampler=False)``.
The sampler is a :class:`~torch.utils.data.distributed.DistributedSampler` subclass, so even with
the default ``use_distributed_sampler=True`` Lightning sees a distributed sampler and leaves it
alone instead of wrapping it (which would shard the shards again).

Test accuracy per epoch (``test_each_epoch=True``, for learning curves): ``val_dataloader``
also serves the test loader, after the validation one, and :attr:`ImageDataModule.val_stages`
names each loader's metric namespace (``("val", "test_epoch")``), which
:class:`~cdi_experiments.lightning.classifier.Classifier` logs as ``test_epoch/{loss,acc}``.
Nothing selects on them: the sweep objective and checkpoint monitors refuse test metrics.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from cdi_experiments import datasets
from cdi_experiments.generator.bits import MASK64, fold

log = logging.getLogger(__name__)

DATA_ORDER_VERSION = 1
"""Bumped on any change to the split or the batch order. Stored in the datamodule's state."""

VAL_STAGE = "val"
TEST_EPOCH_STAGE = "test_epoch"
"""The metric namespace of the test set measured at every validation (``test_each_epoch``)."""

TRAIN_SIZE = 60000
TEST_SIZE = 10000
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)

# Mean and std of all 60000 training images' pixels, scaled to [0, 1]. Recomputed from the
# pinned files: MNIST 0.130660 / 0.308108 (the constants torchvision's examples use),
# FashionMNIST 0.286041 / 0.353024.
NORMALIZATION: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion_mnist": (0.2860, 0.3530),
}

# Stream tags folded into the seeds ("split" and "order" in ASCII), so the data streams never
# coincide with the weight-init streams derived from the same integer seed.
SPLIT_STREAM = 0x73706C6974
ORDER_STREAM = 0x6F72646572
WORKER_STREAM = 0x776F726B6572


def split_indices(val_size: int, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(train_idx, val_idx)``: a disjoint, sorted partition of ``range(60000)``.

    Args:
        val_size: Number of training-file samples held out for validation, in ``[0, 60000)``.
        split_seed: Seed of the permutation that picks them.

    Returns:
        Two int64 tensors of lengths ``60000 - val_size`` and ``val_size``.

    >>> train, val = split_indices(5000)
    >>> len(train), len(val), bool(torch.isin(train, val).any())
    (55000, 5000, False)
    """
    _check_range("val_size", val_size, 0, TRAIN_SIZE - 1)
    perm = torch.randperm(TRAIN_SIZE, generator=_generator(split_seed, SPLIT_STREAM))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Return epoch ``epoch``'s permutation of ``range(n)``: a pure function of ``(n, seed, epoch)``.

    >>> torch.equal(epoch_order(10, 0, 3), epoch_order(10, 0, 3))
    True
    """
    return torch.randperm(n, generator=_generator(seed, ORDER_STREAM, epoch))


def _generator(seed: int, *stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(fold(int(seed) & MASK64, *stream))


class TensorBatchDataset(Dataset):
    """In-memory ``(x, y)`` whose items are whole batches: ``ds[idx] == (x[idx], y[idx])``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}; they must match")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


class ShardedBatchSampler(DistributedSampler):
    """Yields this rank's batches of indices into ``range(n)``, one int64 tensor per batch.

    With ``shuffle=True`` the epoch's order is :func:`epoch_order` ``(n, seed, epoch)``, cut
    into ``num_replicas`` equal contiguous shards (the last ``n % num_replicas`` indices of the
    permutation are dropped, differently each epoch); with ``shuffle=False`` it is ``range(n)``
    split into contiguous in-order pieces that together cover every index once. Within a
    shard, the last batch may be short.

    It subclasses ``DistributedSampler`` only so that Lightning and other libraries recognise it
    as already distributed and do not wrap it; it shares its constructor checks and
    :meth:`set_epoch`, nothing else.

    Args:
        n: Number of samples.
        batch_size: Indices per batch (> 0).
        shuffle: Permute per epoch (training) or keep order (evaluation).
        seed: Shuffling seed.
        num_replicas: World size.
        rank: This process's rank in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_range("batch_size", batch_size, 1)
        _check_range("num_replicas", num_replicas, 1)
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.n = n
        self.batch_size = batch_size
        self.num_samples = len(self._shard(torch.arange(n)))

    def _shard(self, order: torch.Tensor) -> torch.Tensor:
        if self.shuffle:
            m = self.n // self.num_replicas
            return order[self.rank * m : (self.rank + 1) * m]
        return order.tensor_split(self.num_replicas)[self.rank]

    def indices(self) -> torch.Tensor:
        """All of this rank's indices for the current epoch, in the order they are served."""
        order = epoch_order(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        return self._shard(order)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator: the order is drawn at the first next(), not when iter() is called.
        # Lightning creates the loader's iterator before it calls set_epoch() on resume.
        yield from self.indices().split(self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` serves (Lightning calls this)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        super().set_epoch(int(epoch))


class ImageDataModule(pl.LightningDataModule):
    """MNIST or FashionMNIST: 60000 train images split into train/val, plus the 10000 test images.

    Train with ``Trainer(use_distributed_sampler=False)``: the module shards batches over ranks
    itself (see the module docstring). Batches are ``(x, y)``: float32 ``(B, 1, 28, 28)`` (or
    ``(B, 784)`` with ``flatten``) and int64 ``(B,)``.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        root: Data root; ``None`` means :func:`cdi_experiments.datasets.default_data_root`.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        val_size: Images of the training file held out for validation, in ``[0, 60000)``.
        split_seed: Seed of the train/val split.
        limit: If set, use the first ``limit`` training images and at most ``limit`` each of
            validation and test (quick runs).
        normalize: Subtract the dataset mean and divide by its std (:data:`NORMALIZATION`);
            otherwise pixels are in ``[0, 1]``.
        flatten: Serve ``(B, 784)`` instead of ``(B, 1, 28, 28)``.
        seed: Shuffling seed; epoch ``e``'s order is :func:`epoch_order` ``(n, seed, e)``.
        num_workers: DataLoader worker processes (0: load in the main process, usually fastest
            for in-memory data).
        fetch: Fetch the raw files with :func:`cdi_experiments.datasets.fetch` if missing.
        test_each_epoch: Also measure the test set at every validation (learning curves):
            ``val_dataloader`` returns the validation loader (if ``val_size > 0``) and then the
            test loader, named by :attr:`val_stages`. Off by default: it costs one pass over
            the test set per epoch. ``trainer.test``'s ``test/*`` metrics are unchanged.

    Raises:
        ValueError: For an unknown ``name`` or an out-of-range size, seed or worker count.
    """

    def __init__(
        self,
        name: str,
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        limit: int | None = None,
        normalize: bool = True,
        flatten: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        fetch: bool = True,
        test_each_epoch: bool = False,
    ) -> None:
        super().__init__()
        if name not in datasets.DATASETS:
            raise ValueError(
                f"name={name!r} is not a known dataset; use one of {', '.join(datasets.DATASETS)}"
            )
        _check_range("batch_size", batch_size, 1)
        _check_range("eval_batch_size", eval_batch_size, 1)
        _check_range("val_size", val_size, 0, TRAIN_SIZE - 1)
        if limit is not None:
            _check_range("limit", limit, 1)
        _check_range("num_workers", num_workers, 0)
        _check_range("seed", seed, 0, MASK64)
        _check_range("split_seed", split_seed, 0, MASK64)
        if not isinstance(test_each_epoch, bool):
            raise ValueError(f"test_each_epoch must be true or false, got {test_each_epoch!r}")
        self.name = name
        self.root = root
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.limit = None if limit is None else int(limit)
        self.normalize = bool(normalize)
        self.flatten = bool(flatten)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.fetch = bool(fetch)
        self.test_each_epoch = test_each_epoch

        self.num_classes = NUM_CLASSES
        self.input_shape: tuple[int, ...] = (math.prod(IMAGE_SHAPE),) if flatten else IMAGE_SHAPE
        # Resolved in setup() from the attached trainer; set them directly to simulate DDP.
        self.num_replicas = 1
        self.rank = 0
        self.x_train: torch.Tensor | None = None
        self.y_train: torch.Tensor | None = None
        self.x_val: torch.Tensor | None = None
        self.y_val: torch.Tensor | None = None
        self.x_test: torch.Tensor | None = None
        self.y_test: torch.Tensor | None = None

    @property
    def val_stages(self) -> tuple[str, ...]:
        """The metric namespace of each loader :meth:`val_dataloader` returns, in order:
        ``("val",)`` by default, ``("val", "test_epoch")`` with ``test_each_epoch``,
        ``("test_epoch",)`` with ``val_size=0`` too, ``()`` with neither.
        :class:`~cdi_experiments.lightning.classifier.Classifier` logs loader ``i`` as
        ``<val_stages[i]>/{loss,acc}``."""
        return ((VAL_STAGE,) if self.val_size else ()) + (
            (TEST_EPOCH_STAGE,) if self.test_each_epoch else ()
        )

    @property
    def dims(self) -> tuple[int, ...]:
        """Shape of one served sample (Lightning's old ``dims`` attribute); = ``input_shape``."""
        return self.input_shape

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        if self.x_train is not None:  # already in memory: skip re-hashing the files every fit
            return
        if not datasets.is_ready(self.name, self.root):
            if not self.fetch:
                datasets.verify(self.name, self.root)  # raises, naming the fix
            datasets.fetch(self.name, self.root)

    def setup(self, stage: str | None = None) -> None:
        """Resolve world size and rank from the trainer, then decode and normalize (once)."""
        if self.trainer is not None:
            self.num_replicas = self.trainer.world_size
            self.rank = self.trainer.global_rank
        if self.x_train is None:
            self._load()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.x_train, self.y_train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader; with ``test_each_epoch`` a list, the test loader last (one
        loader per :attr:`val_stages` entry); ``[]`` when there is nothing to validate on."""
        loaders = [
            self._loader(self.x_val, self.y_val, self.eval_batch_size, shuffle=False)
            if stage == VAL_STAGE
            else self.test_dataloader()
            for stage in self.val_stages
        ]
        return loaders if self.test_each_epoch or not loaders else loaders[0]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.x_test, self.y_test, self.eval_batch_size, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """What defines the data stream; checked on resume so a run cannot silently switch."""
        train_idx, val_idx = split_indices(self.val_size, self.split_seed)
        return {
            "data_order_version": DATA_ORDER_VERSION,
            "name": self.name,
            "val_size": self.val_size,
            "split_seed": self.split_seed,
            "split_sha256": hashlib.sha256(val_idx.numpy().tobytes()).hexdigest(),
            "limit": self.limit,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume with a different dataset, split, limit, seed or order version.

        Raises:
            ValueError: Naming the keys that differ; resume with the checkpoint's data config.
        """
        mine = self.state_dict()
        diff = {k: (v, mine.get(k)) for k, v in state_dict.items() if mine.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the checkpoint was trained on a different data stream ({details}); resume "
                "with the checkpoint's data config, or start a new run"
            )

    # ------------------------------------------------------------------ public helpers

    def sample_batch(self, n: int) -> torch.Tensor:
        """The first ``n`` training images (deterministic for a given ``split_seed``), e.g. for LSUV.

        Raises:
            ValueError: If ``n`` is not in ``[1, number of training images]``.
        """
        self.setup()
        _check_range("n", n, 1, len(self.x_train))
        return self.x_train[:n]

    # ------------------------------------------------------------------ internals

    def _fit_epoch(self) -> int:
        """The epoch Lightning passes to ``set_epoch`` (0 without a trainer)."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def _load(self) -> None:
        train_idx, val_idx = split_indices(self.val_size, self.split_seed)
        if self.limit is not None:
            train_idx, val_idx = train_idx[: self.limit], val_idx[: self.limit]
        images, targets = self._load_split(train=True)
        self.x_train, self.y_train = self._prepare(images[train_idx]), targets[train_idx]
        self.x_val, self.y_val = self._prepare(images[val_idx]), targets[val_idx]
        images, targets = self._load_split(train=False)
        n_test = len(images) if self.limit is None else min(self.limit, len(images))
        self.x_test, self.y_test = self._prepare(images[:n_test]), targets[:n_test].clone()
        log.info(
            "%s: %d train / %d val / %d test images in memory",
            self.name,
            len(self.x_train),
            len(self.x_val),
            len(self.x_test),
        )

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # load_tensors verifies the checksums itself; fetch only if that fails (a Trainer has
        # run prepare_data() already, but setup() must also work without one).
        try:
            return datasets.load_tensors(self.name, self.root, train=train)
        except datasets.DatasetIntegrityError:
            if not self.fetch:
                raise
            datasets.fetch(self.name, self.root)
            return datasets.load_tensors(self.name, self.root, train=train)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div_(255.0)  # (N, 28, 28) in [0, 1]
        if self.normalize:
            mean, std = NORMALIZATION[self.name]
            x.sub_(mean).div_(std)
        return x.reshape(len(x), *self.input_shape).contiguous()  # (N, 1, 28, 28) or (N, 784)

    def _loader(
        self, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int, shuffle: bool
    ) -> DataLoader:
        if x is None or y is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        sampler = ShardedBatchSampler(
            len(x),
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_replicas=self.num_replicas,
            rank=self.rank,
        )
        if shuffle:
            # Start at the trainer's epoch: on resume, worker processes prefetch from the
            # sampler before Lightning's first set_epoch() call.
            sampler.set_epoch(self._fit_epoch())
        workers: dict[str, Any] = {}
        if self.num_workers > 0:
            # Our batches are deterministic already; seeding the workers keeps any randomness a
            # future transform adds deterministic too (torch seeds worker k with base + k).
            gen = _generator(self.seed, WORKER_STREAM, self.rank)
            workers = {
                "num_workers": self.num_workers,
                "persistent_workers": True,
                "generator": gen,
                "worker_init_fn": _seed_worker,
            }
        return DataLoader(
            TensorBatchDataset(x, y),
            batch_size=None,  # each sampler item is a whole batch
            sampler=sampler,
            collate_fn=_as_is,  # the batch is already (x, y) tensors
            **workers,
        )


def _as_is(batch: Any) -> Any:
    return batch


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's RNGs in a worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _check_range(key: str, value: Any, lo: int, hi: int | None = None) -> None:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be {allowed}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{key}={value} is out of range; use {allowed}")


__all__ = [
    "DATA_ORDER_VERSION",
    "NORMALIZATION",
    "TEST_EPOCH_STAGE",
    "VAL_STAGE",
    "ImageDataModule",
    "ShardedBatchSampler",
    "TensorBatchDataset",
    "epoch_order",
    "split_indices",
]
