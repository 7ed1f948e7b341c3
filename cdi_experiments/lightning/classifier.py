"""``Classifier``: a LightningModule around any model of :mod:`cdi_experiments.models`.

Metrics are exact per-epoch values, ``sum(loss_i) / n`` and ``correct / n`` over every sample the
epoch saw (all ranks), logged once at epoch end as ``{train,val,test}/{loss,acc}``. The steps only
add into two on-device accumulators: no per-step ``self.log`` and no ``.item()`` host sync, which
keeps Lightning's overhead over a plain PyTorch loop small (see ``scripts/bench_training.py``).

Checkpoints load with ``torch.load(path, weights_only=True)``: the hyperparameters are plain
dicts, lists and scalars (OmegaConf objects are converted on the way in), and
``Classifier.load_from_checkpoint(path)`` rebuilds the model from the stored ``model_cfg``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import cdi_experiments
from cdi_experiments.models import build_model

# Every optimizer's accepted keys with their defaults; the resolved dict (defaults filled in) is
# what the checkpoint stores, so a run states its optimizer completely.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    "sgd": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
}
_OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
STAGES = ("train", "val", "test")


def resolve_optimizer_cfg(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate an optimizer config and fill in its defaults.

    Args:
        cfg: ``{"name": "adam" | "adamw" | "sgd", ...}`` with keys from
            :data:`OPTIMIZER_DEFAULTS`; ``None`` means ``{"name": "adam"}``.

    Returns:
        A plain dict with ``name`` and every key of that optimizer.

    Raises:
        ValueError: Unknown name, a key the optimizer does not take, or a non-positive ``lr``.

    >>> resolve_optimizer_cfg({"name": "sgd", "lr": 0.1})
    {'name': 'sgd', 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.0, 'nesterov': False}
    """
    cfg = _plain(cfg or {"name": "adam"})
    name = cfg.pop("name", "adam")
    if name not in OPTIMIZER_DEFAULTS:
        raise ValueError(
            f"optimizer.name={name!r} is unknown; use one of {', '.join(OPTIMIZER_DEFAULTS)}"
        )
    allowed = OPTIMIZER_DEFAULTS[name]
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} takes no key(s) {unknown}; its keys are name, {', '.join(allowed)}"
        )
    resolved = {"name": name, **allowed, **cfg}
    if not (isinstance(resolved["lr"], (int, float)) and resolved["lr"] > 0):
        raise ValueError(f"optimizer.lr must be a positive number, got {resolved['lr']!r}")
    return resolved


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The torch optimizer described by :func:`resolve_optimizer_cfg` ``(cfg)``."""
    kwargs = resolve_optimizer_cfg(cfg)
    name = kwargs.pop("name")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return _OPTIMIZER_CLASSES[name](parameters, **kwargs)


@dataclass
class _Totals:
    """One epoch's sums on one rank: summed per-sample loss, correct predictions, samples."""

    loss_sum: torch.Tensor  # () float64
    correct: torch.Tensor  # () int64
    count: int = 0


class Classifier(pl.LightningModule):
    """Cross-entropy classification of ``(x, y)`` batches with a configurable optimizer.

    Args:
        model: The network. If it came from :func:`cdi_experiments.models.build_model`, its
            ``config`` is stored as ``model_cfg``, so :meth:`load_from_checkpoint` can rebuild it.
        model_cfg: ``{"name": ..., **kwargs}`` for ``build_model``; used when ``model`` is None.
        optimizer: Optimizer config, see :func:`resolve_optimizer_cfg`.

    Raises:
        ValueError: If neither ``model`` nor ``model_cfg`` is given, they disagree, or the
            optimizer config is invalid.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        model_cfg: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model_cfg = None if model_cfg is None else _plain(model_cfg)
        if model is None:
            if model_cfg is None:
                raise ValueError("Classifier needs model=<nn.Module> or model_cfg={'name': ...}")
            model = build_model(**model_cfg)
        own_cfg = getattr(model, "config", None)
        if own_cfg is not None and model_cfg is not None:
            own_cfg = _plain(own_cfg)
            if any(own_cfg.get(k) != v for k, v in model_cfg.items()):
                raise ValueError(
                    f"model_cfg {model_cfg} does not describe the model passed (its config is "
                    f"{own_cfg}); pass only one of them"
                )
        self.model = model
        self.optimizer_cfg = resolve_optimizer_cfg(optimizer)
        # Plain containers only: a weights_only checkpoint load must not meet our classes.
        self.save_hyperparameters(
            {
                "model_cfg": _plain(own_cfg) if own_cfg is not None else model_cfg,
                "optimizer": self.optimizer_cfg,
            }
        )
        self._totals: dict[str, _Totals] = {}

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.parameters(), self.optimizer_cfg)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)  # (B, classes)
        loss = F.cross_entropy(logits, y)
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

    # ------------------------------------------------------------------ epoch hooks

    def on_train_epoch_start(self) -> None:
        self._totals.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        self._totals.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._totals.pop("test", None)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

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
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cdi"] = {
            "package_version": cdi_experiments.__version__,
            "torch_version": str(torch.__version__),  # TorchVersion would break weights_only
            "model_cfg": self.hparams.get("model_cfg"),
        }

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
        was_training = self.training
        self.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        try:
            for x, y in dataloader:
                x, y = x.to(self.device), y.to(self.device)
                logits = self.model(x)
                loss_sum.add_(F.cross_entropy(logits, y), alpha=len(y))  # as in _step
                correct.add_((logits.argmax(dim=1) == y).sum())
                count += len(y)
        finally:
            self.train(was_training)
        if count == 0:
            raise ValueError("evaluate() got an empty dataloader; call datamodule.setup() first")
        return {
            "loss": float(loss_sum) / count,
            "acc": float(correct.double() / count),
            "count": count,
        }


def _plain(value: Any) -> Any:
    """Mappings to dicts, sequences to lists, recursively (OmegaConf containers included)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "OPTIMIZER_DEFAULTS",
    "Classifier",
    "build_optimizer",
    "resolve_optimizer_cfg",
]
