"""Epoch time of the MNIST ``mlp`` under Lightning versus a plain PyTorch loop, same machine.

Variants, each on the same in-memory normalized training tensors of :class:`ImageDataModule`
(the 55000-image train split, or ``--limit``), batch 64, Adam(lr=1e-3), fresh model per run:

* ``lightning``: ``pl.Trainer(max_epochs=1, ...)`` fitting :class:`Classifier` on the datamodule;
  the epoch is timed by a callback from ``on_train_epoch_start`` to ``on_train_end``, so the
  Trainer's one-off set-up is excluded (it is printed separately as ``lightning fit() wall``).
* ``plain``: ``randperm`` each epoch, ``index_select`` the batch, forward, backward, step.
* ``torchvision``: for context only, one pass of torchvision's ``MNIST`` dataset with per-sample
  ``ToTensor`` + ``Normalize`` through a ``DataLoader(batch_size=64, shuffle=True)``, with no
  training at all: the cost of the naive input pipeline alone.

Every variant is warmed up once, then run ``--repeats`` times interleaved (so load changes on
a shared machine hit all of them alike). The ratio uses each variant's best time, the least
noisy estimate of its cost. The last line is exactly ``ratio <lightning / plain>``.

Usage::

    .venv/bin/python scripts/bench_training.py [--limit N] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from cdi_experiments.lightning.classifier import Classifier
from cdi_experiments.lightning.datamodule import NORMALIZATION, ImageDataModule
from cdi_experiments.models import MLP

BATCH_SIZE = 64
OPTIMIZER = {"_target_": "torch.optim.Adam", "lr": 1e-3}


class _EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(dm: ImageDataModule, seed: int) -> tuple[float, float]:
    """One Lightning epoch; returns (epoch seconds, whole fit() seconds)."""
    torch.manual_seed(seed)
    module = Classifier(MLP(), optimizer=OPTIMIZER)
    timer = _EpochTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return timer.seconds, time.perf_counter() - start


def plain_epoch(x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """The same steps in a hand-written loop; returns epoch seconds."""
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=OPTIMIZER["lr"])
    model.train()
    start = time.perf_counter()
    for idx in torch.randperm(len(x)).split(BATCH_SIZE):
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def torchvision_epoch(dataset: torch.utils.data.Dataset) -> float:
    """One pass of the per-sample transform pipeline (no model); returns seconds."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    start = time.perf_counter()
    for _x, _y in loader:
        pass
    return time.perf_counter() - start


def naive_dataset(dm: ImageDataModule) -> torch.utils.data.Dataset:
    """torchvision's MNIST with ToTensor/Normalize per sample, restricted to the same images."""
    from torchvision import datasets as tv_datasets
    from torchvision import transforms

    from cdi_experiments import datasets
    from cdi_experiments.lightning.datamodule import split_indices

    mean, std = NORMALIZATION[dm.name]
    cls = tv_datasets.MNIST if dm.name == "mnist" else tv_datasets.FashionMNIST
    full = cls(
        str(dm.root or datasets.default_data_root()),
        train=True,
        download=False,
        transform=transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((mean,), (std,))]
        ),
    )
    train_idx, _ = split_indices(dm.val_size, dm.split_seed)
    if dm.limit is not None:
        train_idx = train_idx[: dm.limit]
    return torch.utils.data.Subset(full, train_idx.tolist())


def _row(label: str, times: list[float], steps: int) -> str:
    best, median = min(times), statistics.median(times)
    return f"{label:<44} {best:8.3f} {median:9.3f} {1e3 * best / steps:10.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--limit", type=int, default=None, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-torchvision", action="store_true", help="skip the naive pipeline")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and log intervals
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    try:
        dm = ImageDataModule(args.dataset, batch_size=BATCH_SIZE, limit=args.limit)
        dm.setup("fit")
    except ValueError as err:
        print(f"bench_training: {err}", file=sys.stderr)
        return 2
    x, y = dm.x_train, dm.y_train
    steps = -(-len(x) // BATCH_SIZE)
    naive = None if args.skip_torchvision else naive_dataset(dm)

    # Warm-up: allocator, autograd and Lightning's lazy imports.
    lightning_epoch(dm, seed=0)
    plain_epoch(x, y, seed=0)
    if naive is not None:
        torchvision_epoch(naive)

    times: dict[str, list[float]] = {"lightning": [], "fit": [], "plain": [], "torchvision": []}
    for r in range(1, args.repeats + 1):
        epoch_s, fit_s = lightning_epoch(dm, seed=r)
        times["lightning"].append(epoch_s)
        times["fit"].append(fit_s)
        times["plain"].append(plain_epoch(x, y, seed=r))
        if naive is not None:
            times["torchvision"].append(torchvision_epoch(naive))

    print(
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, threads "
        f"{torch.get_num_threads()}, {args.dataset}: {len(x)} images/epoch, batch {BATCH_SIZE} "
        f"({steps} steps), {args.repeats} repeats after 1 warm-up"
    )
    print(f"{'variant':<44} {'best_s':>8} {'median_s':>9} {'ms/step':>10}")
    print(_row("lightning epoch (ImageDataModule+Classifier)", times["lightning"], steps))
    print(_row("plain torch loop epoch", times["plain"], steps))
    print(_row("lightning fit() wall (incl. trainer set-up)", times["fit"], steps))
    if naive is not None:
        print(_row("torchvision per-sample DataLoader, no model", times["torchvision"], steps))
    print(f"ratio {min(times['lightning']) / min(times['plain']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
