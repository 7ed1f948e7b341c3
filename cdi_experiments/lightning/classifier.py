"""``Classifier``: a LightningModule around any ``nn.Module`` that maps images to logits.

Metrics are exact per-epoch values, ``sum(loss_i) / n`` and ``correct / n`` over every sample the
epoch saw (all ranks), logged once at epoch end as ``{train,val,test}/{loss,acc}``. The steps only
add into two on-device accumulators: no per-step ``self.log`` and no ``.item()`` host sync, which
keeps Lightning's overhead over a plain PyTorch loop small (see ``scripts/bench_training.py``).

Several validation loaders: the datamodule's ``val_stages`` attribute names the metric namespace
of each (:class:`~cdi_experiments.lightning.datamodule.ImageDataModule` with
``test_each_epoch=True`` serves ``("val", "test_epoch")``: the test set measured every epoch,
logged as ``test_epoch/{loss,acc}`` with the same exact reduction). A datamodule without the
attribute (or no datamodule) has one validation loader, logged as ``val/*``.

The model, optimizer and LR scheduler are Hydra ``_target_`` configs (plain dicts). Checkpoints
store them as hyperparameters and load with ``torch.load(path, weights_only=True)``;
``Classifier.load_from_checkpoint(path)`` rebuilds the model from the stored ``model_cfg``.
Every checkpoint also carries ``checkpoint["cdi"]``: versions and, when the run set
:attr:`Classifier.run_config`, the composed task config it was trained with (plain containers).

Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2``) :meth:`Classifier.configure_model`
shards the model with FSDP2 (``fully_shard``) for fitting, and the
:class:`~cdi_experiments.lightning.callback.DeterministicInitCallback` fills a model built on the
meta device shard by shard. When fitting ends the shards are gathered back into an ordinary
model on every rank (:meth:`Classifier.on_fit_end`), so testing, pruning and export after
``trainer.fit`` see the same kind of model as after a DDP run.

A non-finite loss (``nan``/``inf``, e.g. from a huge constant init or learning rate) raises
:class:`NonFiniteLossError` at the step that produced it, before the optimizer applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

import cdi_experiments
from cdi_experiments.lightning.callback import DeterministicInitCallback
from cdi_experiments.modules.evaluate import evaluate

DEFAULT_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.Adam", "lr": 1e-3}
STAGES = ("train", "val", "test")
DEFAULT_VAL_STAGES = ("val",)
"""The validation loaders' namespaces when the datamodule names none (``val_stages``)."""


class NonFiniteLossError(RuntimeError):
    """A step's loss is ``nan`` or ``inf``: training cannot continue (one line: where, and what
    to change)."""


def optimizer_factory(cfg: Mapping[str, Any] | None) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer config as a function of the parameters to optimize.

    Args:
        cfg: ``{"_target_": "torch.optim.Adam", "lr": ..., ...}`` (``_partial_`` is implied);
            ``None`` means :data:`DEFAULT_OPTIMIZER`.

    Returns:
        ``make(params) -> torch.optim.Optimizer``.

    >>> make = optimizer_factory({"_target_": "torch.optim.SGD", "lr": 0.1})
    >>> make([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"]
    0.1
    """
    return _partial(cfg if cfg is not None else DEFAULT_OPTIMIZER)


def _partial(cfg: Mapping[str, Any]) -> Callable[..., Any]:
    # _convert_="all": plain lists and dicts, never OmegaConf containers, reach torch (they
    # would end up in the optimizer's state_dict and break a weights_only checkpoint load).
    return instantiate({**_plain(cfg), "_partial_": True}, _convert_="all")


@dataclass
class _Totals:
    """One epoch's sums on one rank: summed per-sample loss, correct predictions, samples."""

    loss_sum: torch.Tensor  # () float64
    correct: torch.Tensor  # () int64
    count: int = 0


class Classifier(pl.LightningModule):
    """Cross-entropy classification of ``(x, y)`` batches with a configurable optimizer.

    Args:
        model: The network; if ``None``, built from ``model_cfg``.
        model_cfg: ``{"_target_": "module.Class", **kwargs}``. Stored in the checkpoint, so
            :meth:`load_from_checkpoint` can rebuild the model; pass it with ``model`` when the
            model was built from it.
        optimizer: ``{"_target_": "torch.optim.Adam", "lr": ..., ...}``, called with the
            parameters; ``None``: :data:`DEFAULT_OPTIMIZER`.
        scheduler: ``{"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", ...}``, called
            with the optimizer and stepped once per epoch; ``None``: a constant LR.

    Raises:
        ValueError: If neither ``model`` nor ``model_cfg`` is given.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        model_cfg: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model_cfg = None if model_cfg is None else _plain(model_cfg)
        if model is None:
            if model_cfg is None:
                raise ValueError(
                    "Classifier needs model=<nn.Module> or model_cfg={'_target_': 'module.Class'}"
                )
            model = instantiate(model_cfg, _convert_="all")
        self.model = model
        self.optimizer_cfg = _plain(optimizer) if optimizer is not None else dict(DEFAULT_OPTIMIZER)
        self.scheduler_cfg = None if scheduler is None else _plain(scheduler)
        self._make_optimizer = optimizer_factory(self.optimizer_cfg)
        self._make_scheduler = None if self.scheduler_cfg is None else _partial(self.scheduler_cfg)
        # Plain containers only: a weights_only checkpoint load must not meet our classes.
        self.save_hyperparameters(
            {
                "model_cfg": model_cfg,
                "optimizer": self.optimizer_cfg,
                "scheduler": self.scheduler_cfg,
            }
        )
        self._totals: dict[str, _Totals] = {}
        self._val_stages: tuple[str, ...] = DEFAULT_VAL_STAGES
        # The composed task config (plain containers), written into every checkpoint so that
        # a checkpoint describes itself; set by the run (cdi_experiments.run.build).
        self.run_config: dict[str, Any] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` twice around every hook call (about 40 times per
        # training step); nn.Module.__setattr__'s Parameter/Module/buffer checks made that
        # ~20% of Lightning's per-step overhead on the MNIST MLP. A plain string attribute
        # needs none of them.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ sharding (FSDP2)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard the model with FSDP2 for fitting;
        a no-op under every other strategy, and when not fitting (the model is then whole).

        Every module that owns parameters gets its own ``fully_shard`` (children first), then
        the model as a whole, over the mesh's ``data_parallel`` dimension: each rank keeps a
        dim-0 shard of every tensor (``Shard(0)``, uneven when the rows do not divide). A
        model built on the meta device is then materialized by the trainer's
        :class:`~cdi_experiments.lightning.callback.DeterministicInitCallback`
        (:meth:`~cdi_experiments.lightning.callback.DeterministicInitCallback.materialize`):
        each rank allocates its shards and fills them from the generator, so Lightning's own
        materialization (``to_empty`` + ``reset_parameters``) has nothing left to do. Without
        that callback, Lightning's runs.

        Raises:
            ValueError: the mesh has a tensor-parallel dimension larger than 1 (not supported
                here: use ``tensor_parallel_size=1``).
        """
        mesh = self.device_mesh
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if mesh is None or not fitting or isinstance(self.model, FSDPModule):
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"Classifier shards with FSDP2 only, but the device mesh has tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()}; use ModelParallelStrategy("
                "tensor_parallel_size=1, data_parallel_size=<all devices>)"
            )
        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for _, module in reversed(list(self.model.named_modules())[1:]):
            if any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=dp)
        fully_shard(self.model, mesh=dp)
        if any(p.is_meta for p in self.model.parameters()):
            for cb in self.trainer.callbacks:
                if isinstance(cb, DeterministicInitCallback):
                    cb.materialize(self.trainer, self)
                    break

    def on_fit_end(self) -> None:
        """Gather an FSDP2-sharded model back into an ordinary one, on every rank (a
        collective: every rank runs this hook), rebuilt from ``model_cfg``. Checkpoints were
        written from the shards already; this is for what comes after ``fit``."""
        if not isinstance(self.model, FSDPModule):
            return
        spec = self.hparams.get("model_cfg")
        if spec is None:  # nothing to rebuild it from: leave it sharded
            return
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        with torch.device("meta"):
            model = instantiate(spec, _convert_="all")
        model.load_state_dict(full, assign=True)  # (the gathered tensors, on this device)
        model.train(self.model.training)
        self.model = model

    def configure_optimizers(self) -> Any:
        optimizer = self._make_optimizer(self.parameters())
        if self._make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._make_scheduler(optimizer)}

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, batch_idx, "train")

    def validation_step(
        self, batch: Sequence[torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if dataloader_idx >= len(self._val_stages):
            raise ValueError(
                f"validation dataloader {dataloader_idx} has no metric namespace: the "
                f"datamodule's val_stages is {self._val_stages!r}; give the datamodule a "
                "val_stages attribute naming one stage per val_dataloader loader, e.g. "
                "('val', 'val_ood')"
            )
        self._step(batch, batch_idx, self._val_stages[dataloader_idx])

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, batch_idx, "test")

    def _step(self, batch: Sequence[torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)  # (B, classes)
        loss = F.cross_entropy(logits, y)
        self._check_finite(loss, batch_idx, stage)
        totals = self._totals.get(stage)
        if totals is None:  # the first step of an epoch
            totals = self._totals[stage] = _Totals(
                torch.zeros((), dtype=torch.float64, device=y.device),
                torch.zeros((), dtype=torch.int64, device=y.device),
            )
        # No autograd here: the detached loss and integer argmax carry no graph.
        totals.loss_sum.add_(loss.detach(), alpha=len(y))
        totals.correct.add_((logits.argmax(dim=1) == y).sum())
        totals.count += len(y)
        return loss

    def _check_finite(self, loss: torch.Tensor, batch_idx: int, stage: str) -> None:
        # One host sync per step (negligible on CPU); under DDP every rank must stop together,
        # or the others would wait forever in the next collective.
        bad = not bool(torch.isfinite(loss))
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss: {stage}/loss={float(loss.detach())} at epoch {self.current_epoch}, "
                f"batch {batch_idx} (global step {self.global_step}); the run stopped; lower "
                "optimizer.lr or change the init (a huge init.params value overflows)"
            )

    # ------------------------------------------------------------------ epoch hooks

    def on_train_epoch_start(self) -> None:
        self._totals.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        self._val_stages = self._resolve_val_stages()
        for stage in self._val_stages:
            self._totals.pop(stage, None)

    def on_test_epoch_start(self) -> None:
        self._totals.pop("test", None)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        for stage in self._val_stages:  # the same order on every rank: one reduce each
            self._log_epoch(stage)

    def _resolve_val_stages(self) -> tuple[str, ...]:
        """The datamodule's ``val_stages`` (one namespace per validation loader), else
        :data:`DEFAULT_VAL_STAGES`.

        Raises:
            ValueError: a namespace that is not a non-empty string without ``/``, is repeated,
                or is ``train``/``test`` (those keys belong to fitting and ``trainer.test``).
        """
        datamodule = getattr(self._trainer, "datamodule", None)
        stages = getattr(datamodule, "val_stages", None)
        if stages is None:
            return DEFAULT_VAL_STAGES
        stages = tuple(stages)
        bad = [
            s
            for s in stages
            if not isinstance(s, str) or not s or "/" in s or s in ("train", "test")
        ]
        if bad or len(set(stages)) != len(stages):
            raise ValueError(
                f"datamodule.val_stages={stages!r} is not allowed; name each validation loader's "
                "metrics once, with a non-empty string without '/' other than 'train' and "
                "'test', e.g. ('val', 'test_epoch')"
            )
        return stages

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        totals = self._totals.pop(stage, None)
        if self.trainer.sanity_checking:
            return
        if totals is None:  # this rank saw no batch; it still joins the reduction
            totals = _Totals(
                torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
            )
        sums = torch.stack(
            [totals.loss_sum, totals.correct.double(), totals.loss_sum.new_tensor(totals.count)]
        ).to(self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # all ranks' samples
        if float(sums[2]) == 0:
            return
        self.log_dict(
            {f"{stage}/loss": sums[0] / sums[2], f"{stage}/acc": sums[1] / sums[2]},
            on_step=False,
            on_epoch=True,
            prog_bar=stage == "val",
            batch_size=1,  # already the epoch's exact value; nothing to average
            add_dataloader_idx=False,  # the stage names the loader (no "/dataloader_idx_1")
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cdi"] = {
            "package_version": cdi_experiments.__version__,
            "torch_version": str(torch.__version__),  # TorchVersion would break weights_only
            "model_cfg": self.hparams.get("model_cfg"),
        }
        if self.run_config is not None:
            checkpoint["cdi"]["config"] = self.run_config

    # ------------------------------------------------------------------ outside the Trainer

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable[Sequence[torch.Tensor]]) -> dict[str, float | int]:
        """Mean loss and accuracy over ``dataloader``, in eval mode, without a Trainer.

        Args:
            dataloader: Yields ``(x, y)`` batches (e.g. ``datamodule.test_dataloader()``).

        Returns:
            ``{"loss": ..., "acc": ..., "count": n}``: the same sums as the Trainer's steps, so
            ``loss`` and ``acc`` equal ``trainer.test``'s ``test/loss`` and ``test/acc``.

        Raises:
            ValueError: If the dataloader yields no samples.
        """
        return evaluate(self.model, dataloader, self.device)


def _plain(value: Any) -> Any:
    """Mappings to dicts, sequences to lists, recursively (OmegaConf containers included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return value


__all__ = ["DEFAULT_OPTIMIZER", "Classifier", "NonFiniteLossError", "optimizer_factory"]
