"""``cdi-showcase``: the whole idea end to end on real MNIST, on a CPU, in well under a minute.

1. He-initialize a 784-128-64-10 MLP from the deterministic generator (``init_module``).
2. Train it with Adam on in-memory tensors.
3. Measure per layer how many weights moved from their *regenerated* initial values, at
   several thresholds (no copy of the initial weights is kept).
4. Prune the weights that did not move ("sleeping") and set magnitude, movement,
   magnitude-increase and random pruning of exactly as many weights per layer beside it.
5. Hold the measurements against the original article's claims; every verdict is computed
   from this run's numbers.
6. Count the input pixels that are zero in every training image and check whether their
   ``fc1`` columns stayed bit-identical.

Mean/std normalization turns an always-zero pixel into a constant ``-0.4242``, which does get
gradients; so unless ``--no-control`` is given, a control run repeats steps 1-6 with the other
input scaling (``x / std``, where zero stays zero) and reports its headline numbers beside
the main run's.

Exit status: 0 on success, 2 for bad flags, 1 when the run fails (e.g. MNIST missing: run
``cdi-data fetch``). Files written under ``--out`` (each atomically) for the main run:
``layers.csv`` (:func:`modules.analyze_module`), ``prune.csv``
(:func:`pruning.prune_and_evaluate`), ``summary.json`` (every headline number, the control
run's too, config and versions) and ``model.pt`` (trained state dict plus the init plan, so
every number can be recomputed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cdi_experiments import __version__, modules, pruning
from cdi_experiments.datasets import load_tensors
from cdi_experiments.generator import DEFAULT_THRESHOLD, GENERATOR_VERSION
from cdi_experiments.generator.core import check_threshold
from cdi_experiments.models import MLP
from cdi_experiments.modules.evaluate import evaluate as evaluate_model
from cdi_experiments.paths import atomic_write
from cdi_experiments.tables import format_frame

log = logging.getLogger(__name__)

PROG = "cdi-showcase"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # over the 60k training pixels, scaled to [0, 1]
MNIST_TRAIN_SIZE = 60000
LAYER_THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
LR, BATCH_SIZE = 1e-3, 64
RANKED = ("magnitude", "movement", "magnitude_increase", "random")

# The original article's claims, held against this run's measurements.
CLAIM_SLEEPING_PCT = (60.0, 70.0)  # "60-70% of weights sleep"
CLAIM_MAX_DROP = 0.001  # "pruning them costs < 0.001 accuracy"

# File names written under --out.
LAYERS_CSV, PRUNE_CSV, SUMMARY_JSON, MODEL_PT = (
    "layers.csv",
    "prune.csv",
    "summary.json",
    "model.pt",
)


@dataclass
class ShowcaseConfig:
    """Everything that determines a run; field names equal the command-line flags."""

    seed: int = 0
    epochs: int = 3
    threshold: float = DEFAULT_THRESHOLD
    limit: int | None = None
    out: Path = Path("outputs/showcase")
    quiet: bool = False
    center: bool = True
    control: bool = True


@dataclass
class ShowcaseResult:
    layers: pd.DataFrame
    prune: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Data:
    train_images: torch.Tensor  # (N, 28, 28) uint8
    y_train: torch.Tensor  # (N,)
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    y_test: torch.Tensor  # (10000,)

    @property
    def always_zero(self) -> torch.Tensor:  # (784,) True where every training image has 0
        return (self.train_images.reshape(len(self.train_images), -1) == 0).all(dim=0)


# ----------------------------------------------------------------------------- training


def _prepare(images: torch.Tensor, center: bool) -> torch.Tensor:
    x = images.reshape(len(images), -1).float() / 255.0  # (N, 784)
    return (x - MNIST_MEAN) / MNIST_STD if center else x / MNIST_STD


def _norm_text(center: bool) -> str:
    return f"(x - {MNIST_MEAN}) / {MNIST_STD}" if center else f"x / {MNIST_STD}"


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    on_epoch: Callable[[int, float, float], None],
) -> None:
    """Adam, plain loop; batch order from a generator seeded with ``seed``."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(x), generator=order)
        total, steps = 0.0, 0
        for i in range(0, len(x), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        on_epoch(epoch, total / steps, time.perf_counter() - start)


# ----------------------------------------------------------------------------- one experiment


@dataclass
class _Outcome:
    model: nn.Module
    plan: modules.InitPlan
    layers: pd.DataFrame
    prune: pd.DataFrame
    facts: dict[str, Any]


def _experiment(
    cfg: ShowcaseConfig, center: bool, data: _Data, say: Callable[[str], None]
) -> _Outcome:
    """Init, train, measure and prune one model; ``say`` gets the progress and tables."""
    threshold = cfg.threshold
    torch.manual_seed(cfg.seed)
    x_train, x_test = _prepare(data.train_images, center), _prepare(data.test_images, center)
    model = MLP()  # 784-128-64-10, fc1..fc3; fc1.weight[:, j] reads pixel j
    plan = modules.init_module(model, cfg.seed, "he", layer_ids="name")
    say(
        f"init: {sum(p.numel() for p in model.parameters()):,} parameters, all regenerable "
        f"from the plan (fingerprint {plan.fingerprint()[:12]})"
    )

    def evaluate(m: nn.Module) -> float:
        return float(evaluate_model(m, [(x_test, data.y_test)])["acc"])

    def on_epoch(epoch: int, loss: float, seconds: float) -> None:
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, "
            f"test acc {evaluate(model):.4f} ({seconds:.1f} s)"
        )

    t0 = time.perf_counter()
    _train(model, x_train, data.y_train, cfg.epochs, cfg.seed, on_epoch)
    train_s = time.perf_counter() - t0

    thresholds = tuple(sorted({*LAYER_THRESHOLDS, threshold}))
    layers = modules.analyze_module(model, plan, thresholds)
    face_value = (sum(CLAIM_SLEEPING_PCT) / 200,)  # the claim's midpoint, as a sparsity
    tables = []
    if threshold != 0.0:
        tables.append(
            pruning.prune_and_evaluate(
                model, plan, evaluate, threshold=0.0, sparsities=(), seed=cfg.seed
            )
        )
    tables.append(
        pruning.prune_and_evaluate(
            model, plan, evaluate, threshold=threshold, sparsities=face_value, seed=cfg.seed
        )
    )
    prune_df = pd.concat(tables, ignore_index=True)

    reference = pruning.sleeping_mask(model, plan, threshold)
    at_zero = pruning.sleeping_mask(model, plan, 0.0)
    matched = pruning.matched_masks(model, plan, reference, RANKED, cfg.seed)
    cols_unchanged = (~at_zero["fc1.weight"]).all(dim=0)  # (784,): column bit-identical to init
    always_zero = data.always_zero
    rows = prune_df[prune_df["target"] == f"matched@{threshold:g}"].set_index("criterion")
    total = layers.set_index("name").loc["__total__"]
    facts = {
        "normalization": _norm_text(center),
        "zero_pixel_input_value": float(_prepare(torch.zeros(1, 1, 1), center)),
        "acc_before": evaluate(model),
        "prunable_weights": reference.numel,
        "sleeping_weights": reference.num_pruned,
        "sleeping_share": reference.sparsity,
        "sleeping_share_at_0": at_zero.sparsity,
        "sleeping_share_all_params": 1.0 - float(total[f"awake_pct@{threshold:g}"]) / 100.0,
        "layer_sleeping_share": reference.layer_sparsity(),
        "matched_acc_delta": {c: float(rows.loc[c, "acc_delta"]) for c in rows.index},
        "same_set_as_sleeping": {c: m == reference for c, m in matched.items()},
        "always_zero_pixels": int(always_zero.sum()),
        "always_zero_pixels_unchanged": int((cols_unchanged & always_zero).sum()),
        "fc1_columns_unchanged": int(cols_unchanged.sum()),
        "plan_fingerprint": plan.fingerprint(),
        "train_seconds": train_s,
    }
    return _Outcome(model, plan, layers, prune_df, facts)


# ----------------------------------------------------------------------------- verdicts


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _share_verdict(share: float) -> str:
    lo, hi = CLAIM_SLEEPING_PCT
    return "reproduced" if lo <= 100 * share <= hi else "NOT reproduced"


def _claim_lines(
    facts: dict[str, Any], prune_df: pd.DataFrame, threshold: float, control: dict | None
) -> list[str]:
    lo, hi = CLAIM_SLEEPING_PCT
    share = facts["sleeping_share"]
    lines = [
        f"Claims of the original article vs this run (threshold {threshold:g}, "
        f"input {facts['normalization']}):",
        f'  "{lo:g}-{hi:g}% of weights sleep": measured sleeping share {_pct(share)} '
        f"({facts['sleeping_weights']:,} of {facts['prunable_weights']:,} weights; "
        f"{_pct(facts['sleeping_share_at_0'])} at threshold 0) -> {_share_verdict(share)}",
    ]
    if control is not None:
        lines.append(
            f"    control, input {control['normalization']}: {_pct(control['sleeping_share'])}"
            f" -> {_share_verdict(control['sleeping_share'])}"
        )
    delta = facts["matched_acc_delta"]["sleeping"]
    ok = -delta < CLAIM_MAX_DROP
    verdict = "reproduced" if ok else "NOT reproduced"
    if ok and _share_verdict(share) != "reproduced":
        verdict += f", but at {_pct(share)} sparsity, not {lo:g}-{hi:g}%"
    lines.append(
        f'  "pruning them costs <{CLAIM_MAX_DROP:g} accuracy": measured test-acc change '
        f"{delta:+.4f} ({facts['acc_before']:.4f} -> {facts['acc_before'] + delta:.4f}) -> {verdict}"
    )
    others = [c for c in facts["matched_acc_delta"] if c != "sleeping"]
    if others:
        lines.append(
            "  same per-layer counts by other criteria, test-acc change: "
            + ", ".join(f"{c} {facts['matched_acc_delta'][c]:+.4f}" for c in others)
        )
    if control is not None:
        d = control["matched_acc_delta"]
        lines.append(
            f"    control: sleeping {d['sleeping']:+.4f}, "
            + ", ".join(f"{c} {d[c]:+.4f}" for c in d if c != "sleeping")
        )
    same = [c for c, equal in facts["same_set_as_sleeping"].items() if equal]
    if same:
        verb = "prunes" if len(same) == 1 else "prune"
        lines.append(
            f"  {', '.join(same)} at the matched counts {verb} exactly the sleeping weights"
        )
    face = prune_df[~prune_df["target"].str.startswith("matched@")]
    if len(face):
        target = face["target"].iloc[0]
        changes = ", ".join(
            f"{r.criterion} {r.acc_delta:+.4f}" for r in face[face["target"] == target].itertuples()
        )
        lines.append(
            f"  at the claimed share, pruning {_pct(float(target))} of every layer changes "
            f"test acc by: {changes}"
        )
    return lines


def _pixel_verdict(facts: dict[str, Any]) -> str:
    n, kept = facts["always_zero_pixels"], facts["always_zero_pixels_unchanged"]
    z = facts["zero_pixel_input_value"]
    if kept == n:
        return (
            "all exactly unchanged: a zero input gives a zero gradient, and Adam never moves "
            "a weight whose gradients were all zero"
        )
    if z != 0.0:
        return f"NOT unchanged: a zero pixel enters as {z:.4f}, not 0, so its weights get gradients"
    return "NOT all unchanged"


def _pixel_lines(facts: dict[str, Any], train_images: int, control: dict | None) -> list[str]:
    n = facts["always_zero_pixels"]
    lines = [f"Input pixels that are 0 in all {train_images:,} training images: {n} of 784"]
    if n == 0:
        return lines
    for label, f in (("this run", facts), ("control", control)):
        if f is None:
            continue
        lines.append(
            f"  {label}, input {f['normalization']}: fc1 columns of those pixels exactly "
            f"unchanged (threshold 0): {f['always_zero_pixels_unchanged']} of {n} -> "
            f"{_pixel_verdict(f)}; unchanged fc1 columns in all: {f['fc1_columns_unchanged']}"
        )
    return lines


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """Deterministic kernels and one thread inside the block; the previous settings after.

    The same bits on every run and core count (and one thread is as fast as two for this
    model, and far steadier on a busy machine).
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def run(cfg: ShowcaseConfig, echo: Callable[[str], None] = print) -> ShowcaseResult:
    """Train, measure, prune and compare; write the files; return the tables and summary.

    Runs under :func:`deterministic_cpu`. ``echo`` receives every console line; with
    ``cfg.quiet`` only the verdict lines.

    Raises:
        DatasetError: MNIST is missing or corrupt (``cdi-data fetch`` fixes it).
        ValueError: a bad config value.
    """
    with deterministic_cpu():
        return _run(cfg, echo)


def _run(cfg: ShowcaseConfig, echo: Callable[[str], None]) -> ShowcaseResult:
    t_start = time.perf_counter()
    threshold = check_threshold(cfg.threshold)
    cfg = ShowcaseConfig(**{**asdict(cfg), "threshold": threshold})
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.limit is not None and not 1 <= cfg.limit <= MNIST_TRAIN_SIZE:
        raise ValueError(f"limit must be in [1, {MNIST_TRAIN_SIZE}], got {cfg.limit}")

    def say(line: str = "") -> None:
        if not cfg.quiet:
            echo(line)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    t0 = time.perf_counter()
    train_images, y_train = load_tensors("mnist", train=True)
    test_images, y_test = load_tensors("mnist", train=False)
    if cfg.limit is not None:
        train_images, y_train = train_images[: cfg.limit], y_train[: cfg.limit]
    data = _Data(train_images, y_train, test_images, y_test)
    say(
        f"{PROG}: real MNIST, 784-128-64-10 MLP, He init (seed {cfg.seed}), Adam {LR:g}, "
        f"batch {BATCH_SIZE}, {cfg.epochs} epoch(s)"
    )
    say(
        f"data: {len(train_images):,} train / {len(test_images):,} test images, "
        f"input {_norm_text(cfg.center)} ({time.perf_counter() - t0:.1f} s)"
    )

    main = _experiment(cfg, cfg.center, data, say)
    say()
    say("Changed share per parameter, % (|w - w0| > t, w0 regenerated from the plan):")
    thresholds = tuple(sorted({*LAYER_THRESHOLDS, threshold}))
    shown = main.layers[["name", "shape", "numel"]].copy()
    formats: dict[str, Callable[[Any], str]] = {}
    for t in thresholds:
        shown[f"t={t:g}"] = main.layers[f"awake_pct@{t:g}"]
        formats[f"t={t:g}"] = "{:.3f}".format
    shown["median |w-w0|"] = main.layers["q50_delta"]
    formats["median |w-w0|"] = "{:.2e}".format
    say(format_frame(shown, formats))
    say()
    say(
        "Pruning (matched@t: sleeping prunes |w - w0| <= t, the others exactly as many weights "
        "per layer; a number prunes that fraction of every layer):"
    )
    say(pruning.format_table(main.prune))

    control = None
    if cfg.control:
        say()
        say(f"control run: the same seed and schedule, input {_norm_text(not cfg.center)}")
        control = _experiment(cfg, not cfg.center, data, say).facts

    summary: dict[str, Any] = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "train_images": len(train_images),
        "test_images": len(test_images),
        "threshold": threshold,
        **main.facts,
        "control": control,
        "generator_version": GENERATOR_VERSION,
        "versions": {
            "cdi_experiments": __version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
    }
    verdicts = _claim_lines(main.facts, main.prune, threshold, control) + _pixel_lines(
        main.facts, len(train_images), control
    )
    say()
    for line in verdicts:
        echo(line)
    summary["verdict_lines"] = verdicts

    out = Path(cfg.out)
    files = {name: out / name for name in (LAYERS_CSV, PRUNE_CSV, SUMMARY_JSON, MODEL_PT)}
    atomic_write(files[LAYERS_CSV], lambda p: main.layers.to_csv(p, index=False))
    atomic_write(files[PRUNE_CSV], lambda p: main.prune.to_csv(p, index=False))
    atomic_write(
        files[MODEL_PT],
        lambda p: torch.save(
            {
                "state_dict": main.model.state_dict(),
                "plan": main.plan.to_dict(),
                "plan_fingerprint": main.facts["plan_fingerprint"],
                "config": summary["config"],
                "versions": summary["versions"],
            },
            p,
        ),
    )
    summary["total_seconds"] = time.perf_counter() - t_start
    atomic_write(files[SUMMARY_JSON], lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    say()
    say(f"wrote {', '.join(str(p) for p in files.values())}")
    say(f"total {summary['total_seconds']:.1f} s")
    return ShowcaseResult(main.layers, main.prune, summary, files)
