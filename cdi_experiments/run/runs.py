"""Run directories read into tidy pandas frames: the reading half of ``cdi-report``.

:func:`load_runs` finds every run below the given folders (single runs, sweep folders, sweeps
nested in sweeps: any directory holding ``run_info.json`` or ``status.json``,
:func:`find_runs`) and reads those whose ``status.json`` says ``finished`` (written last by
``cdi-train``) into :class:`Runs`:

* ``layers``: one row per run x epoch x parameter x threshold (the awakened and sleeping
  shares, mean and max ``|w - w0|``, and that epoch's train/val metrics);
* ``epochs``: one row per run x epoch (train/val/test loss and accuracy);
* ``prune``: one row per run x criterion x target x variant (one-shot, fine-tuned, rewound);
* ``prune_layers``: the pruned share of each parameter (``layer_sparsity``, long form);
* ``histograms``: per-epoch ``|w - w0|`` and weight histogram bins;
* ``runs``: one row per run (``runs.csv``): final numbers.

Every frame carries the run's status and fingerprints and every composed config value,
flattened into dotted columns (``optimizer.lr``, ``init.scheme``, ``data.normalize``...), so
any of them can be grouped by (:func:`cdi_experiments.run.report.aggregate`).

Metrics are read from the run's own files whatever logger was on (:func:`epoch_metrics`:
``metrics.csv``, else TensorBoard event files, else MLflow's file store); a run's config from
``run_info.json``, ``.hydra/config.yaml`` or its last checkpoint (:func:`run_config`). A file
that is missing or cannot be parsed is an :class:`UnreadableFileError` naming it: the run is
left out (:class:`LeftOut`) when its config is unreadable, else the file is named in the
``problems`` column of ``runs``.

Epochs are numbered as in ``layer_changes.csv``: ``-1`` is the initial weights (``init`` in
tables and figures), ``0`` the end of the first training epoch.

Aggregating and writing these frames (``runs.csv``, ``grouped.*``, Markdown and LaTeX) is
:mod:`cdi_experiments.run.report`; drawing them is :mod:`cdi_experiments.run.figures`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from cdi_experiments.paths import (
    CHECKPOINT_DIR,
    DELTA_HIST_CSV,
    LAST_CKPT,
    LAYERS_CSV,
    METRICS_CSV,
    PRUNE_CSV,
    PRUNE_DIR,
    PRUNE_DONE,
    RUN_INFO_JSON,
    STATUS_JSON,
    WANDB_DIR,
)
from cdi_experiments.run.checkpoint import CheckpointError, checkpoint_config, load_checkpoint
from cdi_experiments.run.schema import short_name
from cdi_experiments.run.status import read_status

log = logging.getLogger(__name__)

INIT_EPOCH = -1  # layer_changes.csv's epoch of the initial weights
INIT_LABEL = "init"

SUMMARY_KEYS = (
    "train/acc",
    "train/loss",
    "val/acc",
    "val/loss",
    "test_epoch/acc",  # data.test_each_epoch: the test set at every epoch (learning curves)
    "test_epoch/loss",
    "test/acc",
    "test/loss",
)
WEIGHT_HIST_CSV = "weight_histograms.csv"  # read when a run has one (same columns as deltas)
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


def epoch_label(epoch: int) -> str:
    """``"init"`` for the initial weights (epoch ``-1``), else the epoch number."""
    return INIT_LABEL if int(epoch) == INIT_EPOCH else str(int(epoch))


# Run-level columns every tidy frame starts with (then the flattened config).
META_COLUMNS = (
    "run",
    "label",
    "run_name",
    "status",
    "config_sha256",
    "init_fingerprint",
    "generator_version",
    "config_source",
    "data",
    "model",
    "optimizer",
    "init",
    "seed",
)
# Config subtrees left out of the columns: the callbacks repeat init/tracking, the loggers and
# run_dir say where a run wrote, not what it was.
_SKIP_CONFIG = ("callbacks", "logger", "run_dir", "hydra")
PRUNE_VARIANTS = {"acc_after": "one-shot", "acc_finetuned": "fine-tuned", "acc_rewound": "rewound"}


class UnreadableFileError(ValueError):
    """A run's file that is missing or cannot be parsed; names the file and what is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_csv(path: Path) -> pd.DataFrame:
    """``pd.read_csv(path)``, with every failure an :class:`UnreadableFileError` naming ``path``."""
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise UnreadableFileError(path, "missing") from None
    except pd.errors.EmptyDataError:
        raise UnreadableFileError(path, "empty") from None
    except (ValueError, pd.errors.ParserError) as exc:  # also UnicodeDecodeError
        reason = " ".join(str(exc).split())[:120]
        raise UnreadableFileError(path, f"not a CSV table ({reason})") from None
    except OSError as exc:
        raise UnreadableFileError(path, f"unreadable ({exc.strerror})") from None


def final_metrics(run_dir: Path, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
    """Train/val/test loss and accuracy at the end of a run.

    ``metrics`` (e.g. ``trainer.callback_metrics``) wins where it has a key; the rest is the
    last logged value in the run's own metric files (:func:`epoch_metrics`: ``metrics.csv``,
    else TensorBoard's event files). ``trainer.test`` clears the train and val entries of
    ``callback_metrics``, so without this the summary would show test figures only.

    Raises:
        UnreadableFileError: a metrics file exists but cannot be parsed.
    """
    out = {k: float(v) for k, v in (metrics or {}).items() if k in SUMMARY_KEYS}
    em = epoch_metrics(Path(run_dir))
    if em is not None:
        for key in SUMMARY_KEYS:
            if key not in out and key in em:
                values = em[key].dropna()
                if len(values):
                    out[key] = float(values.iloc[-1])
        if "train/acc" in em and em["train/acc"].notna().any():
            out["epochs"] = int(em.loc[em["train/acc"].notna(), "epoch"].max()) + 1
    return out


# ----------------------------------------------------------------------------- one run's files


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Every run directory (holding ``run_info.json`` or ``status.json``) at or below ``roots``
    (sorted, unique)."""
    runs: set[Path] = set()
    for root in roots:
        root = Path(root)
        for marker in (RUN_INFO_JSON, STATUS_JSON):
            runs.update(p.parent for p in root.rglob(marker))
            if (root / marker).exists():
                runs.add(root)
    return sorted(runs)


@dataclass(frozen=True)
class LeftOut:
    """A run that is not in the report, and the file that says why."""

    run: Path
    file: Path
    problem: str


def not_finished(run: Path) -> LeftOut | None:
    """Why ``run`` is not a finished run (``None`` if its ``status.json`` says finished)."""
    path = Path(run) / STATUS_JSON
    status = read_status(run)
    if status is None:
        if path.exists():
            return LeftOut(run, path, "unreadable (not a status cdi-train wrote)")
        return LeftOut(
            run, path, "missing: the run did not finish (or predates status.json); rerun it"
        )
    if status["state"] != "finished":
        reason = f": {status['reason']}" if status.get("reason") else ""
        pid = (
            f" (pid {status.get('pid')} on {status.get('host')})"
            if status["state"] == "running"
            else ""
        )
        return LeftOut(run, path, f"{status['state']}{pid}{reason}")
    return None


def _init_label(init: Mapping[str, Any]) -> str:
    label = str(init["scheme"])
    if init.get("overrides"):
        label += "+" + ",".join(
            f"{k}={v if isinstance(v, str) else v.get('scheme', v)}"
            for k, v in init["overrides"].items()
        )
    return label


def _read_info(run: Path) -> dict[str, Any] | None:
    """``run_info.json`` as a dict (``None`` if absent).

    Raises:
        UnreadableFileError: it exists but is not JSON or not readable.
    """
    path = run / RUN_INFO_JSON
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableFileError(path, f"unreadable ({exc.strerror})") from None
    except ValueError as exc:
        raise UnreadableFileError(path, f"not JSON ({exc})") from None
    if not isinstance(info, dict):
        raise UnreadableFileError(path, "not a run's info (not a JSON object)")
    return info


def run_config(run: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """The composed config of ``run``, where it came from, and ``run_info.json``'s content.

    The config is read from ``run_info.json`` (resolved, as the run used it), else
    ``.hydra/config.yaml`` (interpolations resolved where they can be), else the config the
    last checkpoint stores.

    Raises:
        UnreadableFileError: no source holds a run's config, or ``run_info.json`` is corrupt
            (it names the file and what is wrong).
    """
    run = Path(run)
    info = _read_info(run)
    if info is not None:
        if not isinstance(info.get("config"), dict):
            raise UnreadableFileError(run / RUN_INFO_JSON, "not a run's info (no 'config')")
        return info["config"], run / RUN_INFO_JSON, info
    hydra = run / HYDRA_CONFIG
    if hydra.exists():
        try:
            node = OmegaConf.load(hydra)
            try:
                cfg = OmegaConf.to_container(node, resolve=True)
            except Exception:  # an interpolation only a Hydra job can resolve: keep it as text
                cfg = OmegaConf.to_container(node, resolve=False)
        except Exception as exc:
            raise UnreadableFileError(hydra, f"not a YAML config ({exc})") from None
        return dict(cfg), hydra, {}
    ckpt = run / CHECKPOINT_DIR / LAST_CKPT
    if ckpt.exists():
        try:
            stored = checkpoint_config(load_checkpoint(ckpt, "rerun the run"))
        except CheckpointError as exc:
            raise UnreadableFileError(ckpt, str(exc)) from None
        if stored is not None:
            return stored, ckpt, {}
    raise UnreadableFileError(
        run / RUN_INFO_JSON, f"missing (and no {HYDRA_CONFIG} or checkpoint config)"
    )


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"optimizer.lr": 0.001, ...}``: one column per leaf value.

    Lists become text (``"[128, 64]"``) so that they can be grouped by; empty mappings, and the
    ``callbacks``, ``logger``, ``run_dir`` and ``hydra`` subtrees at the top, are left out.

    >>> flatten_config({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "logger": {"csv": {}}})
    {'optimizer.lr': 0.1, 'optimizer.betas': '[0.9, 0.99]'}
    """
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if not prefix and key in _SKIP_CONFIG:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = value
    return out


def run_meta(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run-level columns of ``run`` (:data:`META_COLUMNS`, then the flattened config),
    and ``run_info.json``'s content (``{}`` without one).

    Raises:
        UnreadableFileError: no readable config, or one without ``data``, ``model``, ``init``
            or ``seed``.
    """
    cfg, source, info = run_config(run)
    try:
        model = (
            info.get("model_name")
            or (cfg["model"].get("name") if "name" in cfg["model"] else None)
            or short_name(cfg["model"]["_target_"])
        )
        opt = cfg.get("optimizer") or {}
        status = read_status(run) or {}
        gen = info.get("generator") or {}
        meta: dict[str, Any] = {
            "run": str(run),
            "label": "",
            "run_name": cfg.get("run_name") or run.name,
            "status": status.get("state", "missing"),
            "config_sha256": status.get("config_sha256"),
            "init_fingerprint": gen.get("fingerprint"),
            "generator_version": gen.get("version"),
            "config_source": source.relative_to(run).as_posix(),
            "data": cfg["data"]["name"],
            "model": model,
            "optimizer": short_name(opt["_target_"]) if "_target_" in opt else None,
            "init": _init_label(cfg["init"]),
            "seed": cfg["seed"],
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise UnreadableFileError(source, f"not a run's info (no {exc})") from None
    meta.update(flatten_config(cfg))
    return meta, info


def _tensorboard_metrics(run: Path) -> pd.DataFrame | None:
    """Per-epoch train/val/test metrics from the TensorBoard event files below ``run`` (a run
    logged with ``logger=tensorboard`` only has no ``metrics.csv``); ``None`` if none."""
    files = sorted(run.rglob("events.out.tfevents.*"))
    if not files:
        return None
    # Lazy: tensorboard is optional and slow to import; only TensorBoard-only runs need it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[tuple[str, int], dict[str, float]] = {}
    for f in files:
        try:
            acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
            acc.Reload()
            tags = set(acc.Tags().get("scalars", []))
        except Exception as exc:
            raise UnreadableFileError(f, f"not a TensorBoard event file ({exc})") from None
        if "epoch" not in tags:
            continue
        epoch_at = {e.step: int(e.value) for e in acc.Scalars("epoch")}  # Lightning logs it
        for key in SUMMARY_KEYS:
            if key in tags:
                for e in acc.Scalars(key):
                    if e.step in epoch_at:
                        rows.setdefault((f.name, e.step), {"epoch": epoch_at[e.step]})[key] = (
                            e.value
                        )
    if not rows:
        return None
    return pd.DataFrame(list(rows.values()))


def _mlflow_metrics(run: Path) -> pd.DataFrame | None:
    """Per-epoch train/val/test metrics from MLflow's file store below ``run``
    (``mlruns/<experiment>/<run>/metrics/<key>``: lines of ``timestamp value step``), for a
    run logged with ``logger=mlflow`` only; ``None`` if there is none."""
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for epoch_file in sorted(run.glob("mlruns/*/*/metrics/epoch")):
        metrics = epoch_file.parent

        def points(path: Path) -> list[tuple[float, int]]:
            try:
                out = []
                for line in path.read_text().splitlines():
                    _, value, step = line.split()
                    out.append((float(value), int(step)))
                return out
            except (OSError, ValueError) as exc:
                raise UnreadableFileError(path, f"not an MLflow metric file ({exc})") from None

        epoch_at = {step: int(value) for value, step in points(epoch_file)}
        for key in SUMMARY_KEYS:
            path = metrics / key
            if path.is_file():
                for value, step in points(path):
                    if step in epoch_at:
                        rows.setdefault((str(metrics), step), {"epoch": epoch_at[step]})[key] = (
                            value
                        )
    return pd.DataFrame(list(rows.values())) if rows else None


def epoch_metrics(run: Path) -> pd.DataFrame | None:
    """The run's train/val/test metrics, one row per epoch (``epoch`` plus the
    :data:`SUMMARY_KEYS` it logged), from ``metrics.csv`` or, without one, TensorBoard's
    event files or MLflow's file store. ``None`` if the run has none of them (a W&B-only run:
    its history is only in ``wandb/*.wandb``, which cannot be read offline).

    Lightning logs the test after the last epoch with ``epoch`` one past it; its row is put on
    the last training epoch (the weights it measured).

    Raises:
        UnreadableFileError: the file cannot be parsed or holds text where numbers belong.
    """
    path = run / METRICS_CSV
    if path.exists():
        df = read_csv(path)
    else:
        df = _tensorboard_metrics(run)
        if df is None:
            df = _mlflow_metrics(run)
        if df is None:
            return None
        path = run
    if "epoch" not in df:
        raise UnreadableFileError(path, "corrupt (no 'epoch' column)")
    keys = [k for k in SUMMARY_KEYS if k in df]
    try:
        df = df[["epoch", *keys]].apply(pd.to_numeric, errors="raise")
    except (TypeError, ValueError) as exc:  # text where numbers belong
        raise UnreadableFileError(path, f"corrupt values ({exc})") from None
    df = df.dropna(subset=["epoch"]).astype({"epoch": int})
    fit = [k for k in keys if not k.startswith("test/")]
    fitted = df.dropna(subset=fit, how="all")["epoch"] if fit else df["epoch"].iloc[:0]
    if len(fitted):
        df.loc[df["epoch"] > fitted.max(), "epoch"] = int(fitted.max())
    if not keys:
        return pd.DataFrame(columns=["epoch"])
    return df.groupby("epoch", as_index=False)[keys].last()  # last non-null value per epoch


def _layers_long(ld: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``layer_changes.csv`` in long form: one row per epoch x parameter x threshold."""
    need = {"epoch", "name", "numel", "mean_delta", "max_delta"}
    cols = [c for c in ld.columns if str(c).startswith("awake_pct@")]
    if not need <= set(ld.columns) or not cols:
        missing = sorted(need - set(ld.columns)) or ["awake_pct@<t>"]
        raise UnreadableFileError(path, f"corrupt (no {', '.join(missing)} column)")
    try:
        long = ld.melt(
            id_vars=sorted(need), value_vars=cols, var_name="threshold", value_name="awake_pct"
        )
        long["threshold"] = long["threshold"].str.split("@").str[1].astype(float)
        long["awake_pct"] = long["awake_pct"].astype(float)
        long["epoch"] = long["epoch"].astype(int)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(path, f"corrupt values ({exc})") from None
    long = long.rename(columns={"name": "param"})
    long["sleeping_pct"] = 100.0 - long["awake_pct"]
    long.insert(1, "epoch_label", long["epoch"].map(epoch_label))
    order = ["epoch", "epoch_label", "param", "numel", "threshold", "awake_pct", "sleeping_pct"]
    return long[[*order, "mean_delta", "max_delta"]].sort_values(
        ["epoch", "threshold"], kind="stable", ignore_index=True
    )


def _prune_files(run: Path) -> list[tuple[str, Path]]:
    """``(source, prune_results.csv)``: the run's own (``train``), then each complete
    ``cdi-prune`` invocation's (``prune/<name>/``, with its ``DONE`` marker)."""
    out = [("train", run / PRUNE_CSV)] if (run / PRUNE_CSV).exists() else []
    for sub in sorted((run / PRUNE_DIR).glob(f"*/{PRUNE_CSV}")):
        if (sub.parent / PRUNE_DONE).exists():
            out.append((sub.parent.name, sub))
    return out


def _prune_long(pdf: pd.DataFrame, source: str, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One ``prune_results.csv`` as (variants in long form, ``layer_sparsity`` in long form)."""
    need = {"criterion", "target", "sparsity", "acc_before", "acc_after"}
    if not need <= set(pdf.columns):
        raise UnreadableFileError(path, f"corrupt (no {', '.join(sorted(need - set(pdf)))})")
    ids = ["criterion", "target", "sparsity", "num_pruned", "acc_before"]
    ids = [c for c in ids if c in pdf]
    variants = [c for c in PRUNE_VARIANTS if c in pdf]
    try:
        long = pdf.melt(id_vars=ids, value_vars=variants, var_name="variant", value_name="acc")
        long["variant"] = long["variant"].map(PRUNE_VARIANTS)
        long["acc"] = long["acc"].astype(float)
        layer_rows = []
        if "layer_sparsity" in pdf:
            for r in pdf.itertuples():
                if isinstance(r.layer_sparsity, str):
                    for param, share in json.loads(r.layer_sparsity).items():
                        layer_rows.append(
                            {
                                "criterion": r.criterion,
                                "target": r.target,
                                "param": param,
                                "layer_sparsity": float(share),
                            }
                        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise UnreadableFileError(path, f"corrupt values ({exc})") from None
    long.insert(0, "source", source)
    layers = pd.DataFrame(layer_rows, columns=["criterion", "target", "param", "layer_sparsity"])
    layers.insert(0, "source", source)
    return long.dropna(subset=["acc"]), layers


def _tensorboard_histograms(run: Path) -> pd.DataFrame | None:
    """The weight histograms a TensorBoard logger wrote below ``run`` (``weights/<tensor>`` at
    step ``epoch + 1``), as ``epoch, name, low, high, count`` rows; ``None`` if there are none.
    TensorBoard stores right bucket edges: a bucket's left edge is the previous one's right
    edge (the first one's: the minimum)."""
    files = sorted(run.rglob("events.out.tfevents.*"))
    if not files:
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for f in files:
        try:
            acc = EventAccumulator(str(f), size_guidance={"histograms": 0, "scalars": 1})
            acc.Reload()
            tags = [t for t in acc.Tags().get("histograms", []) if t.startswith("weights/")]
            for tag in tags:
                for event in acc.Histograms(tag):
                    h = event.histogram_value
                    low = h.min
                    for high, count in zip(h.bucket_limit, h.bucket, strict=True):
                        if count:
                            rows.append(
                                {
                                    "epoch": int(event.step) - 1,
                                    "name": tag.removeprefix("weights/"),
                                    "low": float(max(low, h.min)),
                                    "high": float(min(high, h.max)),
                                    "count": int(count),
                                }
                            )
                        low = high
        except Exception as exc:  # a truncated or foreign event file
            raise UnreadableFileError(f, f"not a TensorBoard event file ({exc})") from None
    return pd.DataFrame(rows) if rows else None


def _histograms(run: Path) -> list[pd.DataFrame]:
    """The run's histograms with a ``kind`` column: ``abs_delta`` (``delta_histograms.csv``)
    and ``weight`` (``weight_histograms.csv``, else the TensorBoard logger's ``weights/``
    histograms).

    Raises:
        UnreadableFileError: a histogram file that cannot be parsed.
    """
    out = []
    for kind, name in (("abs_delta", DELTA_HIST_CSV), ("weight", WEIGHT_HIST_CSV)):
        path = run / name
        h = None
        if path.exists():
            h = read_csv(path)
            if not {"epoch", "name", "low", "high", "count"} <= set(h.columns):
                raise UnreadableFileError(path, "corrupt (needs epoch, name, low, high, count)")
        elif kind == "weight":
            h = _tensorboard_histograms(run)
        if h is not None:
            h = h.rename(columns={"name": "param"})
            h.insert(0, "kind", kind)
            h.insert(2, "epoch_label", h["epoch"].map(epoch_label))
            out.append(h)
    return out


@dataclass
class _RunFrames:
    meta: dict[str, Any]
    row: dict[str, Any]
    frames: dict[str, list[pd.DataFrame]] = field(default_factory=dict)


def _read_run(run: Path) -> _RunFrames:
    """Everything one run's files say. A missing or corrupt metrics, layer, prune or histogram
    file is named in ``row["problems"]``; the rest is still read.

    Raises:
        UnreadableFileError: no readable config (the run is left out of the report).
    """
    meta, info = run_meta(run)
    problems: list[str] = []
    frames: dict[str, list[pd.DataFrame]] = {
        k: [] for k in ("layers", "epochs", "prune", "prune_layers", "histograms")
    }

    def problem(exc: UnreadableFileError) -> None:
        name = exc.path.relative_to(run).as_posix() if exc.path.is_relative_to(run) else exc.path
        problems.append(f"{name} {exc.problem}".strip())

    row: dict[str, Any] = {"epochs": (meta.get("trainer.max_epochs"))}
    em = None
    try:
        em = epoch_metrics(run)
        if em is None:
            hint = ""
            if (run / WANDB_DIR).is_dir():
                hint = (
                    " (a W&B-only run: its history is only in wandb/*.wandb, which cannot be "
                    "read offline; add logger=csv)"
                )
            problems.append(f"{METRICS_CSV} missing{hint}")
    except UnreadableFileError as exc:
        problem(exc)
    fm = {k: float(v) for k, v in (info.get("final_metrics") or {}).items() if k in SUMMARY_KEYS}
    if em is not None and len(em):
        frames["epochs"].append(em.assign(epoch_label=em["epoch"].map(epoch_label)))
        for key in SUMMARY_KEYS:
            if key in em and em[key].notna().any():
                fm[key] = float(em[key].dropna().iloc[-1])
        if "train/acc" in em and em["train/acc"].notna().any():
            row["epochs"] = int(em.loc[em["train/acc"].notna(), "epoch"].max()) + 1
    for key in ("train/acc", "val/acc", "test/acc", "test/loss"):
        if key in fm:
            row[key] = fm[key]
    path = run / LAYERS_CSV
    try:
        if path.exists():
            long = _layers_long(read_csv(path), path)
            if em is not None and len(em):
                fit = [k for k in em.columns if k in SUMMARY_KEYS and not k.startswith("test/")]
                long = long.merge(em[["epoch", *fit]], on="epoch", how="left")
            frames["layers"].append(long)
            last = long[(long["epoch"] == long["epoch"].max()) & (long["param"] == "all")]
            for t, v in zip(last["threshold"], last["awake_pct"], strict=True):
                row[f"awake_all@{t:g}"] = float(v)
    except UnreadableFileError as exc:
        problem(exc)
    for source, path in _prune_files(run):
        try:
            long, layers = _prune_long(read_csv(path), source, path)
            frames["prune"].append(long)
            frames["prune_layers"].append(layers)
            if source == "train":
                matched = long[long["target"].astype(str).str.startswith("matched")]
                for r in matched.itertuples():
                    suffix = {"one-shot": "", "fine-tuned": "_finetuned", "rewound": "_rewound"}
                    row[f"prune_{r.criterion}_acc_after{suffix[r.variant]}"] = r.acc
                    row["prune_sparsity"] = r.sparsity
        except UnreadableFileError as exc:
            problem(exc)
    try:
        frames["histograms"].extend(_histograms(run))
    except UnreadableFileError as exc:
        problem(exc)
    row["problems"] = "; ".join(problems)
    for frame_list in frames.values():
        for f in frame_list:
            f.insert(0, "run", str(run))
    return _RunFrames(meta, row, frames)


# ----------------------------------------------------------------------------- many runs


@dataclass
class Runs:
    """Every reported run as tidy frames (:func:`load_runs`); each frame starts with the
    run-level columns (:data:`META_COLUMNS`, then the flattened config, ``config_columns``)."""

    runs: pd.DataFrame
    layers: pd.DataFrame
    epochs: pd.DataFrame
    prune: pd.DataFrame
    prune_layers: pd.DataFrame
    histograms: pd.DataFrame
    left_out: list[LeftOut] = field(default_factory=list)
    config_columns: list[str] = field(default_factory=list)

    FRAMES = ("layers", "epochs", "prune", "prune_layers", "histograms")

    def varying(self) -> list[str]:
        """The config columns whose value differs between runs (the swept ones), without
        ``seed``, what follows it (``data.seed: ${seed}``) and ``run_name``: seeds are what
        :func:`~cdi_experiments.run.report.aggregate` and the figures' bands average over."""
        return swept_columns(self.runs, self.config_columns)


def swept_columns(table: pd.DataFrame, config_columns: Sequence[str]) -> list[str]:
    """The columns of ``config_columns`` whose value differs between the rows of ``table``
    (one per run), except ``seed``, columns equal to it on every run, and ``run_name``."""
    if table.empty or "seed" not in table:
        return []
    seed = table["seed"].astype(str)
    out = []
    for c in config_columns:
        if c in ("seed", "run_name") or c not in table:
            continue
        values = table[c].astype(str)
        if values.nunique(dropna=False) > 1 and not values.equals(seed):
            out.append(c)
    return out


def _labels(table: pd.DataFrame, swept: Sequence[str] = ()) -> list[str]:
    """Short, unique run labels: ``model data init sN``, then the swept values
    (``lr=0.01``: the last part of each varying config key), then the directory name where
    that is still not unique."""
    base = []
    for _, r in table.iterrows():
        extra = " ".join(f"{c.rsplit('.', 1)[-1]}={r[c]}" for c in swept)
        base.append(
            f"{r['model']} {r['data']} {r['init']} s{r['seed']}" + (f" {extra}" * bool(extra))
        )
    counts = {b: base.count(b) for b in base}
    return [
        b if counts[b] == 1 else f"{b} ({Path(run).name})"
        for b, run in zip(base, table["run"], strict=True)
    ]


def load_runs(roots: Iterable[Path], finished_only: bool = True) -> Runs:
    """Read every run below ``roots`` into tidy frames.

    Args:
        roots: Run directories, sweep directories, or folders holding them at any depth.
        finished_only: Read only runs whose ``status.json`` says ``finished`` (``cdi-train``
            draws a run's own figures before it writes that, with ``False``).

    Returns:
        :class:`Runs`; runs not finished, or without a readable config, are in ``left_out``
        with the file that says why. Frames are empty (no columns) when no run has that file.
    """
    read: list[_RunFrames] = []
    left_out: list[LeftOut] = []
    for run in find_runs(roots):
        why = not_finished(run) if finished_only else None
        if why is not None:
            left_out.append(why)
            continue
        try:
            read.append(_read_run(run))
        except UnreadableFileError as exc:
            left_out.append(LeftOut(run, exc.path, exc.problem))
    meta = pd.DataFrame([r.meta for r in read])
    config_columns: list[str] = []
    if not meta.empty:
        config_columns = [c for c in meta.columns if c not in META_COLUMNS]
        config_columns = ["seed", *sorted(config_columns)]
        swept = [
            c
            for c in swept_columns(meta, config_columns)
            if c not in ("init.scheme", "data.name", "optimizer._target_")
        ]
        if "optimizer._target_" in meta and meta["optimizer._target_"].nunique() > 1:
            swept.insert(0, "optimizer")  # its short name (adam, sgd), not the class path
        meta["label"] = _labels(meta, swept)
        meta = meta[[*META_COLUMNS, *config_columns[1:]]]
    frames: dict[str, pd.DataFrame] = {}
    for name in Runs.FRAMES:
        parts = [f for r in read for f in r.frames[name] if len(f)]
        frames[name] = (
            meta.merge(pd.concat(parts, ignore_index=True), on="run") if parts else (pd.DataFrame())
        )
    table = pd.DataFrame()
    if read:
        rows = pd.DataFrame([{"run": r.meta["run"], **r.row} for r in read])
        lead = meta[[*META_COLUMNS]]
        table = lead.merge(rows, on="run").merge(meta[["run", *config_columns[1:]]], on="run")
        if not table["problems"].astype(bool).any():
            table = table.drop(columns=["problems"])
    return Runs(table, **frames, left_out=left_out, config_columns=config_columns)


def collect_all(
    roots: Iterable[Path], finished_only: bool = True
) -> tuple[pd.DataFrame, list[LeftOut]]:
    """``runs.csv``'s table for the runs below ``roots``, and the runs left out
    (:func:`load_runs`' ``runs`` and ``left_out``)."""
    runs = load_runs(roots, finished_only)
    return runs.runs, runs.left_out


def collect(roots: Iterable[Path], finished_only: bool = True) -> pd.DataFrame:
    """:func:`collect_all`'s table; each run left out is logged as a warning naming its file."""
    table, left_out = collect_all(roots, finished_only)
    for item in left_out:
        log.warning("skipping %s: %s %s", item.run, item.file, item.problem)
    return table


__all__ = [
    "INIT_EPOCH",
    "INIT_LABEL",
    "META_COLUMNS",
    "PRUNE_VARIANTS",
    "SUMMARY_KEYS",
    "LeftOut",
    "Runs",
    "UnreadableFileError",
    "collect",
    "collect_all",
    "epoch_label",
    "epoch_metrics",
    "final_metrics",
    "find_runs",
    "flatten_config",
    "load_runs",
    "not_finished",
    "read_csv",
    "run_config",
    "run_meta",
    "swept_columns",
]
