"""``outputs/paper/``: the paper's tables, figures and ``RESULTS.md``, built from the runs that
``scripts/reproduce.sh`` made (never from numbers typed in by hand).

Layout of a paper directory (``<out>``)::

    runs/<experiment>/...           cdi-train -m sweeps, one folder per experiment= preset
    signal/signal_propagation.csv   :func:`signal_experiment` (no training)
    bench/bench_generator.txt       scripts/bench_generator.py's output
    tables/<name>.{csv,md,tex}      :func:`build_paper`
    figures/<name>.{png,pdf}
    RESULTS.md                      each source claim beside its measurement

Entry point: ``python -m cdi_experiments.run.paper {signal,build} ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from cdi_experiments.generator.facade import DeterministicNoiseGenerator
from cdi_experiments.lightning.datamodule import ImageDataModule
from cdi_experiments.modules.plan import plan_from_dict
from cdi_experiments.modules.signal import ACTIVATIONS, signal_frame
from cdi_experiments.paths import RunPaths, atomic_write_csv, atomic_write_text
from cdi_experiments.run import figures as F
from cdi_experiments.run.checkpoint import CheckpointError, init_state, load_checkpoint
from cdi_experiments.run.report import aggregate, write_tables
from cdi_experiments.run.resume import epochs_done
from cdi_experiments.run.runs import Runs, load_runs
from cdi_experiments.timing import timings

log = logging.getLogger(__name__)

# The experiment= presets, in the order reproduce.sh runs them; runs/<name>/ holds each sweep.
EXPERIMENTS = ("mnist_demo", "fashion_init_comparison", "pruning", "sleeping")
SIGNAL_CSV = "signal/signal_propagation.csv"
BENCH_TXT = "bench/bench_generator.txt"
STARTED_FILE = "started_at.txt"  # reproduce.sh writes the first launch time (UTC, ISO) here
LAUNCHES_TXT = "launches.txt"  # reproduce.sh appends "<start> <experiments done>" per launch
RESULTS_MD = "RESULTS.md"
README_SNIPPET = "README_snippet.md"  # the headline table and figures, for the project README
README_FIGURES = ("learning_curves", "sleeping_mlp_mnist", "prune_accuracy", "signal_propagation")
# The init schemes of the comparison (configs/experiment/fashion_init_comparison.yaml).
SCHEMES = (
    "zeros",
    "ones",
    "uniform",
    "uniform_fan_in",
    "normal_fan_in",
    "keras_default",
    "torch_default",
    "he",
    "xavier",
    "lecun",
    "orthogonal",
    "lsuv",
)
CHANCE = 0.1  # 10 balanced classes
AT_CHANCE = 0.15  # "stays at chance": test accuracy at most this (the majority class is 0.1135)
SLEEP_THRESHOLD = 1e-5


# ----------------------------------------------------------------------------- signal propagation


def signal_experiment(
    out: Path,
    *,
    dataset: str = "mnist",
    batch_size: int = 256,
    seeds: Sequence[int] = (0, 1, 2),
    depth: int = 20,
    width: int = 256,
    schemes: Sequence[str] = SCHEMES,
    root: str | None = None,
) -> Path:
    """Signal propagation at init (:func:`~cdi_experiments.modules.signal.signal_frame`) on
    the first ``batch_size`` normalized training images of ``dataset``; writes
    ``<out>/signal/signal_propagation.csv``. A finished file with the same settings is kept
    (a relaunch skips it).

    Returns:
        The CSV's path.
    """
    path = Path(out) / SIGNAL_CSV
    want = {
        "seed": sorted(int(s) for s in seeds),
        "scheme": sorted(schemes),
        "depth": depth,
        "width": width,
    }
    if path.is_file():
        old = pd.read_csv(path)
        have = {
            "seed": sorted(old["seed"].unique().tolist()),
            "scheme": sorted(old["scheme"].unique().tolist()),
            "depth": int(old["depth"].iloc[0]),
            "width": int(old["width"].iloc[0]),
        }
        if have == want:
            log.info("signal propagation: %s is done, skipped", path)
            return path
    dm = ImageDataModule(name=dataset, root=root, limit=batch_size, flatten=True, normalize=True)
    dm.setup("fit")
    x, y = dm.x_train[:batch_size], dm.y_train[:batch_size]  # (B, 784), (B,)
    frame = signal_frame(
        x, y, schemes, activations=ACTIVATIONS, seeds=seeds, depth=depth, width=width
    )
    frame.insert(0, "dataset", dataset)
    atomic_write_csv(path, frame)
    return path


# ----------------------------------------------------------------------------- machine and bench


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    """Where this ran: CPU model, logical CPUs, the threads torch uses, OS, versions."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "cpu": cpu_model(),
        "logical_cpus": str(os.cpu_count()),
        "training": "2 cdi-train jobs at a time (joblib), 1 torch/numba thread each",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15min_at_build": " ".join(f"{v:.1f}" for v in load),
    }


@dataclass
class Bench:
    """The 1000 x 1000 He timings from ``bench_generator.txt`` (milliseconds, best of N)."""

    ours_ms: float
    torch_ms: float
    header: str


_BENCH_ROW = re.compile(
    r"^\s*(ours: init_tensor \(numba\)|torch: kaiming_normal_\(torch\.empty\))\s+best\s+([0-9.]+) ms"
)


def one_million_bench(out: Path, repeats: int = 5, threads: int = 2) -> Path:
    """Time the 1M-weight claim only (1000 x 1000 He, ours vs ``kaiming_normal_``, best of
    ``repeats`` after a warm-up call) and write it to ``<out>/bench/bench_generator.txt`` in
    ``scripts/bench_generator.py``'s format (which also times 4096 x 4096 and the numpy
    fallback: minutes on a busy 2-core machine, so the quick profile uses this instead)."""
    torch.set_num_threads(threads)
    gen = DeterministicNoiseGenerator(42)
    shape = (1000, 1000)

    def best(fn: Callable[[], object]) -> float:
        return timings(fn, repeats)[0]

    ours = best(lambda: gen.init_tensor(0, shape, "he"))
    theirs = best(lambda: torch.nn.init.kaiming_normal_(torch.empty(shape)))
    text = (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"cpu count {os.cpu_count()}, threads torch={torch.get_num_threads()} "
        f"(cdi_experiments.run.paper one_million_bench, best of {repeats})\n\n"
        "1000 x 1000 float32 He (1.00 M weights)\n"
        f"  ours: init_tensor (numba)              best {ours * 1e3:8.2f} ms\n"
        f"  torch: kaiming_normal_(torch.empty)    best {theirs * 1e3:8.2f} ms\n"
    )
    path = Path(out) / BENCH_TXT
    atomic_write_text(path, text)
    return path


def read_bench(path: Path) -> Bench | None:
    """Parse ``scripts/bench_generator.py``'s output; None if missing or not in that format."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    section = text.split("1000 x 1000", 1)
    if len(section) < 2:
        return None
    found: dict[str, float] = {}
    for line in section[1].splitlines():
        m = _BENCH_ROW.match(line)
        if m:
            found.setdefault(m.group(1).split(":")[0], float(m.group(2)))
    if {"ours", "torch"} - set(found):
        return None
    return Bench(found["ours"], found["torch"], text.splitlines()[0])


# ----------------------------------------------------------------------------- helpers


def pm(mean: float, std: float, n: int, fmt: str = "{:.4f}", unit: str = "") -> str:
    """``"0.8123 ± 0.0042 (n=3)"``, ``unit`` after each number; no std for a single value."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if n <= 1 or std is None or not math.isfinite(std):
        return f"{fmt.format(mean)}{unit} (n={n})"
    return f"{fmt.format(mean)}{unit} ± {fmt.format(std)}{unit} (n={n})"


def _stats(values: pd.Series) -> tuple[float, float, int]:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _last_epoch(layers: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last tracked epoch."""
    last = layers.groupby("run")["epoch"].transform("max")
    return layers[layers["epoch"] == last]


def _near(series: pd.Series, value: float) -> pd.Series:
    return (series.astype(float) - value).abs() <= 1e-12 + 1e-9 * abs(value)


def _settings(runs: pd.DataFrame) -> str:
    """The settings that hold for every run of an experiment: epochs, training images, seeds."""
    if runs.empty:
        return ""
    parts = []
    for col, name in (("trainer.max_epochs", "epochs"), ("data.limit", "training images")):
        if col in runs:
            vals = sorted({str(v) for v in runs[col].tolist()})
            vals = ["all" if v in ("None", "nan", "") else v for v in vals]
            parts.append(f"{name} {', '.join(vals)}")
    seeds = sorted(int(s) for s in runs["seed"].unique())
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """One source claim: what was claimed, what was measured, the verdict and its settings."""

    claim: str
    source: str
    measured: str
    verdict: str
    settings: str
    detail: str = ""


@dataclass
class Paper:
    """Everything :func:`build_paper` read and wrote."""

    out: Path
    experiments: dict[str, Runs] = field(default_factory=dict)
    signal: pd.DataFrame = field(default_factory=pd.DataFrame)
    bench: Bench | None = None
    claims: list[Claim] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _missing(claim: str, source: str, what: str) -> Claim:
    return Claim(claim, source, "not measured", "not measured", f"{what} has no finished run yet")


Sources = Mapping[str, "Runs | None"]


def _sources(runs: Runs | Sources | None) -> dict[str, Runs]:
    """``{experiment: Runs}`` with layer rows; a bare :class:`Runs` is ``experiment=sleeping``."""
    named = {"sleeping": runs} if isinstance(runs, Runs) or runs is None else dict(runs)
    return {k: r for k, r in named.items() if r is not None and not r.layers.empty}


def _tracked_last(sources: dict[str, Runs]) -> tuple[pd.DataFrame, str]:
    """The last tracked epoch of every run of every source, with an ``experiment`` column, and
    each source's settings."""
    frames = [_last_epoch(r.layers).assign(experiment=name) for name, r in sources.items()]
    settings = "; ".join(f"{name}: {_settings(r.runs)}" for name, r in sources.items())
    return pd.concat(frames, ignore_index=True), settings


def _inputs(normalize: object) -> str:
    return "normalized" if str(normalize) == "True" else "raw [0,1]"


def claim_sleeping(runs: Runs | Sources | None) -> Claim:
    """60-70 % of weights sleep (|w - w0| <= 1e-5) after training, per experiment cell (the
    sleeping grid, and the pruning experiment's runs, which are tracked the same way)."""
    text, src = "60-70 % of weights sleep at threshold 1e-5", "000, 001"
    sources = _sources(runs)
    if not sources:
        return _missing(text, src, "experiment=sleeping / pruning")
    last, settings = _tracked_last(sources)
    rows = last[(last["param"] == "all") & _near(last["threshold"], SLEEP_THRESHOLD)]
    keys = ["experiment", "data", "model", "optimizer", "data.normalize"]
    cells = []
    for key, g in rows.groupby(keys, dropna=False):
        mean, std, n = _stats(g["sleeping_pct"])
        cells.append((key, mean, std, n))
    holds = [c for c in cells if 60.0 <= c[1] <= 70.0]
    means = [c[1] for c in cells]
    lines = [
        f"- {e}: {d} {m} {o} {_inputs(nz)}: {pm(mean, std, n, '{:.2f}', ' %')} sleeping"
        for (e, d, m, o, nz), mean, std, n in cells
    ]
    verdict = (
        f"holds in {len(holds)} of {len(cells)} settings"
        if holds
        else f"fails in all {len(cells)} settings"
    )
    measured = f"{min(means):.2f} % to {max(means):.2f} % sleeping (whole network, last epoch)"
    return Claim(text, src, measured, verdict, settings, "\n".join(lines))


def claim_prune_cost(runs: Runs | None) -> Claim:
    """Pruning the sleeping weights (one-shot) costs < 0.001 test accuracy."""
    text, src = "pruning the sleeping weights costs < 0.001 accuracy", "000, 001"
    if runs is None or runs.prune.empty:
        return _missing(text, src, "experiment=pruning")
    p = runs.prune
    rows = p[
        (p["criterion"] == "sleeping")
        & p["target"].astype(str).str.startswith("matched")
        & (p["variant"] == "one-shot")
    ].copy()
    rows["cost"] = rows["acc_before"] - rows["acc"]
    lines, ok, cells, costs = [], 0, 0, []
    for (d, nz), g in rows.groupby(["data", "data.normalize"], dropna=False):
        cm, cs, n = _stats(g["cost"])
        sm, ss, _ = _stats(g["sparsity"] * 100)
        cells += 1
        ok += int(cm < 1e-3)
        costs.append((cm, sm))
        lines.append(
            f"- {d} {'normalized' if str(nz) == 'True' else 'raw [0,1]'}: cost "
            f"{pm(cm, cs, n, '{:.4f}')} at sparsity {pm(sm, ss, n, '{:.2f}', ' %')}"
        )
    verdict = f"holds in {ok} of {cells} settings" if ok else f"fails in all {cells} settings"
    measured = (
        "one-shot accuracy cost (before - after) "
        + ", ".join(f"{c:.4f} at {sp:.2f} % pruned" for c, sp in costs)
        + " (mean per setting)"
    )
    return Claim(text, src, measured, verdict, _settings(runs.runs), "\n".join(lines))


def _input_param(layers: pd.DataFrame) -> str:
    """The first weight parameter in a run's module order (fc1.weight, conv1.weight)."""
    names = [p for p in dict.fromkeys(layers["param"]) if str(p).endswith(".weight")]
    numbered = sorted(names, key=lambda n: (re.sub(r"\d+", "", n), int(re.sub(r"\D", "", n) or 0)))
    firsts = [n for n in numbered if re.search(r"(^|\.)(fc|conv)1\.weight$", n)]
    return firsts[0] if firsts else (names[0] if names else "")


def claim_input_layer(runs: Runs | Sources | None) -> Claim:
    """The input layer has the largest awakened share (at 1e-5) of all weight layers."""
    text, src = "the input layer changes most (largest awakened share)", "000"
    sources = _sources(runs)
    if not sources:
        return _missing(text, src, "experiment=sleeping / pruning")
    last, settings = _tracked_last(sources)
    rows = last[_near(last["threshold"], SLEEP_THRESHOLD) & last["param"].str.endswith(".weight")]
    lines, wins, total = [], 0, 0
    for (e, d, m), g in rows.groupby(["experiment", "data", "model"], dropna=False):
        first = _input_param(g)
        per_run = g.pivot_table(index="run", columns="param", values="awake_pct")
        others = per_run.drop(columns=[first]).max(axis=1)
        k = int((per_run[first] > others).sum())  # strictly: a tie (all 100 %) is no win
        ties = int((per_run[first] == others).sum())
        wins += k
        total += len(per_run)
        means = per_run.mean().sort_values(ascending=False)
        order = ", ".join(f"{p} {v:.2f} %" for p, v in means.items())
        tied = f" ({ties} tied with another layer)" if ties else ""
        lines.append(
            f"- {e}: {d} {m}: {first} strictly largest in {k} of {len(per_run)} runs{tied}; "
            f"mean awake: {order}"
        )
    verdict = (
        "holds" if wins == total else ("fails" if wins == 0 else f"holds in {wins} of {total} runs")
    )
    measured = f"input layer has the largest awakened share in {wins} of {total} runs"
    return Claim(text, src, measured, verdict, settings, "\n".join(lines))


def _acc_by_init(runs: Runs | None) -> pd.DataFrame:
    if runs is None or runs.runs.empty:
        return pd.DataFrame()
    return aggregate(runs.runs, ["data", "init"], ["test/acc", "val/acc"])


def _init_rows(table: pd.DataFrame, init: str) -> tuple[float, float, int]:
    row = table[table["init"] == init]
    if row.empty:
        return math.nan, math.nan, 0
    r = row.iloc[0]
    return float(r["test/acc_mean"]), float(r["test/acc_std"]), int(r["n_runs"])


def claim_zero_init(demo: Runs | None, comparison: Runs | None) -> Claim:
    text, src = "zero init stays at chance", "002, 003"
    tables = [(n, _acc_by_init(r)) for n, r in (("MNIST demo", demo), ("FashionMNIST", comparison))]
    lines, verdicts, measured = [], [], []
    for name, table in tables:
        mean, std, n = _init_rows(table, "zeros") if not table.empty else (math.nan, math.nan, 0)
        if n == 0:
            continue
        verdicts.append(mean <= AT_CHANCE)
        lines.append(f"- {name}: test accuracy {pm(mean, std, n)} (chance {CHANCE:g})")
        measured.append(f"{name} {mean:.4f}")
    if not verdicts:
        return _missing(text, src, "experiment=mnist_demo / fashion_init_comparison")
    verdict = "holds" if all(verdicts) else ("fails" if not any(verdicts) else "mixed")
    measured = f"all-zero init test accuracy {', '.join(measured)} (at chance: <= {AT_CHANCE:g})"
    settings = "; ".join(
        f"{n}: {_settings(r.runs)}" for n, r in (("demo", demo), ("comparison", comparison)) if r
    )
    return Claim(text, src, measured, verdict, settings, "\n".join(lines))


def claim_one_zero_layer(demo: Runs | None) -> Claim:
    text, src = "one zeroed layer (fc1) still learns somewhat", "003"
    table = _acc_by_init(demo)
    partial = [i for i in table.get("init", pd.Series(dtype=str)) if "fc1=zeros" in str(i)]
    if table.empty or not partial:
        return _missing(text, src, "experiment=mnist_demo")
    mean, std, n = _init_rows(table, partial[0])
    rm, rs, rn = _init_rows(table, "torch_default")
    verdict = "holds" if mean > AT_CHANCE else "fails"
    lines = [
        f"- only fc1 zero ({partial[0]}): {pm(mean, std, n)}",
        f"- random (torch_default): {pm(rm, rs, rn)}",
    ]
    measured = f"test accuracy {mean:.4f} (random init: {rm:.4f})"
    return Claim(text, src, measured, verdict, _settings(demo.runs), "\n".join(lines))


def claim_he_xavier(comparison: Runs | None, signal: pd.DataFrame) -> Claim:
    text, src = "He beats Xavier under ReLU", "004"
    table = _acc_by_init(comparison)
    lines, verdicts = [], []
    measured = []
    if not table.empty:
        he, xa = _init_rows(table, "he"), _init_rows(table, "xavier")
        if he[2] and xa[2]:
            diff = he[0] - xa[0]
            spread = max(v for v in (he[1], xa[1], 0.0) if math.isfinite(v))
            within = abs(diff) <= spread
            lines.append(
                f"- FashionMNIST ReLU MLP, test accuracy: He {pm(*he)}, Xavier {pm(*xa)}; "
                f"difference {diff:+.4f} ({'within' if within else 'beyond'} one seed std)"
            )
            if within:
                measured.append(f"accuracy difference {diff:+.4f}, within seed noise")
            else:
                verdicts.append(diff > 0)
                measured.append(f"accuracy difference {diff:+.4f}")
    if not signal.empty:
        relu = signal[signal["activation"] == "relu"]
        deepest = int(relu["depth"].max()) - 1  # the last hidden layer
        at = relu[relu["layer"] == deepest]
        h = _stats(at[at["scheme"] == "he"]["act_std"])
        x = _stats(at[at["scheme"] == "xavier"]["act_std"])
        if h[2] and x[2]:
            verdicts.append(abs(math.log(h[0])) < abs(math.log(x[0])))
            lines.append(
                f"- 20-layer ReLU MLP at init, activation std at layer {deepest}: "
                f"He {pm(*h, '{:.3g}')}, Xavier {pm(*x, '{:.3g}')} (1 = preserved)"
            )
            measured.append(f"layer-{deepest} activation std He {h[0]:.3g} vs Xavier {x[0]:.3g}")
    if not measured:
        return _missing(text, src, "experiment=fashion_init_comparison / signal propagation")
    if not verdicts:
        verdict = "no difference beyond seed noise"
    else:
        verdict = "holds" if all(verdicts) else ("fails" if not any(verdicts) else "mixed")
        if any("seed noise" in m for m in measured):
            verdict += " (signal at init); accuracy: no difference beyond seed noise"
    settings = [f"comparison: {_settings(comparison.runs)}"] if comparison is not None else []
    if not signal.empty:
        settings.append(
            f"signal propagation: {int(signal['depth'].max())} layers of width "
            f"{int(signal['width'].max())}, seeds {', '.join(map(str, sorted(signal['seed'].unique())))}"
        )
    return Claim(text, src, "; ".join(measured), verdict, "; ".join(settings), "\n".join(lines))


def claim_speed(bench: Bench | None) -> Claim:
    text, src = "1M weights generated in under 1 ms", "000, 001"
    if bench is None:
        return _missing(text, src, "scripts/bench_generator.py")
    verdict = "holds" if bench.ours_ms < 1.0 else "fails"
    measured = (
        f"{bench.ours_ms:.2f} ms for 1000 x 1000 He (best of N); "
        f"torch.nn.init.kaiming_normal_ {bench.torch_ms:.2f} ms"
    )
    return Claim(text, src, measured, verdict, bench.header)


# ----------------------------------------------------------------------------- tables and figures


def _tables(paper: Paper) -> None:
    t = Path(paper.out) / "tables"
    ex = paper.experiments

    def write(frame: pd.DataFrame, name: str) -> None:
        if not frame.empty:
            paper.tables += write_tables(frame, t / name)

    for name in ("mnist_demo", "fashion_init_comparison"):
        if name in ex and not ex[name].runs.empty:
            write(aggregate(ex[name].runs, ["data", "init"], ["val/acc", "test/acc"]), name)
    if "sleeping" in ex and not ex["sleeping"].layers.empty:
        last = _last_epoch(ex["sleeping"].layers)
        keys = ["data", "model", "optimizer", "data.normalize", "param", "threshold"]
        write(aggregate(last, keys, ["sleeping_pct"]), "sleeping_last_epoch")
        whole = last[last["param"] == "all"]
        wide = aggregate(whole, keys[:4] + ["threshold"], ["sleeping_pct"])
        write(wide, "sleeping_all_params")
    if "pruning" in ex and not ex["pruning"].prune.empty:
        keys = ["data", "data.normalize", "criterion", "target", "variant"]
        write(aggregate(ex["pruning"].prune, keys, ["sparsity", "acc_before", "acc"]), "pruning")
    if not paper.signal.empty:
        s = paper.signal
        depth = int(s["depth"].max())
        keep = s[s["layer"].isin([1, depth // 2, depth - 1, depth])]
        write(
            aggregate(keep, ["activation", "scheme", "layer"], ["act_std", "grad_std"]),
            "signal_propagation",
        )
    if paper.claims:
        frame = pd.DataFrame(
            [
                {"claim": c.claim, "source": c.source, "measured": c.measured, "verdict": c.verdict}
                for c in paper.claims
            ]
        )
        write(frame, "claims")


def _figure(paper: Paper, name: str, make: Callable[[], object]) -> None:
    """Draw one figure; a figure that cannot be drawn is logged, not fatal (others still come)."""
    try:
        fig = make()
    except Exception as exc:  # noqa: BLE001 - one figure failing must not lose the rest
        log.warning("figure %s not drawn: %s", name, exc)
        return
    paper.figures += F.save_figure(fig, Path(paper.out) / "figures" / name)


def weight_histograms(run: str | os.PathLike, bins: int = 60) -> pd.DataFrame:
    """Signed weight histograms of one finished run: its initial weights (epoch -1, regenerated
    from the plan in its checkpoint) and its last epoch's (the checkpoint), on the same bins per
    tensor, in the ``histograms`` frame's long form (``kind="weight"``).

    Raises:
        CheckpointError: the run has no readable checkpoint or no init plan in it.
    """
    path = RunPaths(Path(run)).last_ckpt
    ckpt = load_checkpoint(path, fix="rerun the experiment")
    state = init_state(ckpt)
    if not state or not state.get("plan"):
        raise CheckpointError(f"{path}: no DeterministicInitCallback plan in the checkpoint")
    plan = plan_from_dict(state["plan"])
    last = epochs_done(ckpt) - 1
    rows = []
    for name in plan.names():
        trained = ckpt["state_dict"].get(f"model.{name}")
        if trained is None:
            continue
        w0 = plan.initial(name, trained.dtype).to(torch.float64).reshape(-1)  # as trained from
        w = trained.detach().to(torch.float64).reshape(-1)
        lo, hi = float(min(w0.min(), w.min())), float(max(w0.max(), w.max()))
        if hi <= lo:  # a constant tensor: one bin around it
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        for epoch, values in ((-1, w0), (last, w)):
            counts = torch.histogram(values, bins=edges).hist
            rows += [
                {
                    "run": str(run),
                    "kind": "weight",
                    "epoch": epoch,
                    "param": name,
                    "low": float(edges[k]),
                    "high": float(edges[k + 1]),
                    "count": int(c),
                }
                for k, c in enumerate(counts.tolist())
            ]
    return pd.DataFrame(rows)


def _figures(paper: Paper) -> None:
    ex = paper.experiments
    curves = [ex[n].epochs for n in ("mnist_demo", "fashion_init_comparison") if n in ex]
    curves = [c for c in curves if not c.empty]
    if curves:
        epochs = pd.concat(curves, ignore_index=True)
        _figure(
            paper, "learning_curves", lambda: F.learning_curves(epochs, hue="init", panel="data")
        )
    if "sleeping" in ex and not ex["sleeping"].layers.empty:
        layers = ex["sleeping"].layers
        for (d, m), g in layers.groupby(["data", "model"]):
            _figure(
                paper,
                f"sleeping_{m}_{d}",
                lambda g=g: F.sleeping_share(
                    g, threshold=SLEEP_THRESHOLD, hue="param", panel=["optimizer", "data.normalize"]
                ),
            )
    if "pruning" in ex and not ex["pruning"].prune.empty:
        prune = ex["pruning"].prune
        _figure(
            paper,
            "prune_accuracy",
            lambda: F.prune_accuracy(prune, hue="criterion", panel=["data", "data.normalize"]),
        )
    if "fashion_init_comparison" in ex and not ex["fashion_init_comparison"].histograms.empty:
        hist = ex["fashion_init_comparison"].histograms
        he = hist[hist["init"] == "he"] if (hist["init"] == "he").any() else hist
        first = he[he["run"] == he["run"].iloc[0]]
        try:  # the signed weights beside |w - w0|, at init and at the last epoch
            first = pd.concat([weight_histograms(first["run"].iloc[0]), first], ignore_index=True)
        except (CheckpointError, OSError) as exc:
            log.warning("weight histograms left out: %s", exc)
        epochs = sorted(first["epoch"].unique())
        chosen = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
        _figure(paper, "histograms_fashion_he", lambda: F.histograms(first, epochs=chosen))
    if not paper.signal.empty:
        _figure(paper, "signal_propagation", lambda: F.signal_propagation(paper.signal))


# ----------------------------------------------------------------------------- RESULTS.md


def launches(out: Path) -> list[tuple[dt.datetime, dt.datetime]]:
    """``(start, experiments done)`` of each ``reproduce.sh`` launch (``launches.txt``)."""
    path = Path(out) / LAUNCHES_TXT
    found = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            start, end = (dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in line.split())
        except ValueError:
            continue
        found.append((start, end))
    return found


def results_markdown(paper: Paper, command: str, profile: str, started: str | None) -> str:
    """The text of ``RESULTS.md``: every claim with its measurement, then the provenance."""
    now = dt.datetime.now(dt.UTC)
    lines = [
        "# Results: the source documents' claims beside what this run measured",
        "",
        f"Written by `cdi_experiments.run.paper` on {now:%Y-%m-%d %H:%M} UTC from the runs below "
        f"`{paper.out}`; nothing here is typed by hand. Profile: **{profile}**.",
        "",
        "| claim | source | measured | verdict |",
        "|---|---|---|---|",
    ]
    for c in paper.claims:
        lines.append(f"| {c.claim} | {c.source} | {c.measured} | **{c.verdict}** |")
    lines += ["", "## Details and settings", ""]
    for c in paper.claims:
        lines += [
            f"### {c.claim}",
            "",
            f"Verdict: **{c.verdict}**. Settings: {c.settings or '-'}",
            "",
        ]
        if c.detail:
            lines += [c.detail, ""]
    lines += ["## Experiments", ""]
    for name in EXPERIMENTS:
        r = paper.experiments.get(name)
        if r is None or r.runs.empty:
            lines.append(f"- `experiment={name}`: no finished runs")
            continue
        left = f", {len(r.left_out)} left out (unfinished or unreadable)" if r.left_out else ""
        lines.append(
            f"- `experiment={name}`: {len(r.runs)} finished runs{left}; {_settings(r.runs)}"
        )
    if not paper.signal.empty:
        s = paper.signal
        lines.append(
            f"- signal propagation: {s['scheme'].nunique()} schemes x "
            f"{s['activation'].nunique()} activations x {s['seed'].nunique()} seeds, "
            f"{int(s['depth'].max())}-layer MLP of width {int(s['width'].max())}, one batch of "
            f"{s['dataset'].iloc[0] if 'dataset' in s else ''} training images"
        )
    lines += ["", "## Provenance", ""]
    lines.append(f"- command: `{command}`")
    if started:
        lines.append(f"- first launched: {started}; this file written: {now:%Y-%m-%dT%H:%M:%SZ}")
    for start, end in launches(paper.out):
        minutes = (end - start).total_seconds() / 60
        lines.append(
            f"- launch {start:%Y-%m-%d %H:%M:%S} UTC: experiments took {minutes:.1f} min wall "
            "(benchmark, signal propagation and every sweep; finished jobs of an earlier launch "
            "are skipped, so a relaunch is short)"
        )
    for k, v in machine().items():
        lines.append(f"- {k}: {v}")
    if paper.bench is not None:
        lines.append(f"- generator benchmark: {paper.bench.header}")
    lines += ["", "## Tables and figures", ""]
    for p in sorted({p.with_suffix("") for p in paper.tables}):
        lines.append(f"- table `{p.relative_to(paper.out)}`.{{csv,md,tex}}")
    for p in sorted({p.with_suffix("") for p in paper.figures}):
        lines.append(f"- figure `{p.relative_to(paper.out)}`.{{png,pdf}}")
    return "\n".join(lines) + "\n"


def readme_snippet(paper: Paper, command: str) -> str:
    """The README's results section: the claims table, the figures to show, the command."""
    rel = Path(paper.out)
    lines = [
        f"Made by `{command}` ({rel}/RESULTS.md has the details, settings and machine).",
        "",
        "| claim (source) | measured | verdict |",
        "|---|---|---|",
    ]
    for c in paper.claims:
        lines.append(f"| {c.claim} ({c.source}) | {c.measured} | {c.verdict} |")
    lines.append("")
    made = {p.stem for p in paper.figures if p.suffix == ".png"}
    for name in README_FIGURES:
        if name in made:
            lines.append(f"![{name.replace('_', ' ')}]({rel}/figures/{name}.png)")
    return "\n".join(lines) + "\n"


def build_paper(
    out: Path, command: str = "", profile: str = "full", experiments: Sequence[str] = EXPERIMENTS
) -> Paper:
    """Read ``<out>/runs/<experiment>``, the signal CSV and the benchmark; write the tables,
    figures and ``RESULTS.md`` under ``out``. Missing experiments are reported as not measured.

    Args:
        out: The paper directory (``outputs/paper``).
        command: The command that made the runs (recorded in ``RESULTS.md``).
        profile: ``full`` or ``quick``.
        experiments: The presets to read.

    Returns:
        :class:`Paper`.
    """
    out = Path(out)
    paper = Paper(out)
    for name in experiments:
        root = out / "runs" / name
        if root.is_dir():
            paper.experiments[name] = load_runs([root])
    if (out / SIGNAL_CSV).is_file():
        paper.signal = pd.read_csv(out / SIGNAL_CSV)
    paper.bench = read_bench(out / BENCH_TXT)
    ex = paper.experiments
    paper.claims = [
        claim_sleeping({"sleeping": ex.get("sleeping"), "pruning": ex.get("pruning")}),
        claim_prune_cost(ex.get("pruning")),
        claim_input_layer({"sleeping": ex.get("sleeping"), "pruning": ex.get("pruning")}),
        claim_zero_init(ex.get("mnist_demo"), ex.get("fashion_init_comparison")),
        claim_one_zero_layer(ex.get("mnist_demo")),
        claim_he_xavier(ex.get("fashion_init_comparison"), paper.signal),
        claim_speed(paper.bench),
    ]
    _tables(paper)
    _figures(paper)
    started_path = out / STARTED_FILE
    started = started_path.read_text().strip() if started_path.is_file() else None
    atomic_write_text(out / RESULTS_MD, results_markdown(paper, command, profile, started))
    atomic_write_text(out / README_SNIPPET, readme_snippet(paper, command))
    return paper


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """``python -m cdi_experiments.run.paper signal|build --out DIR ...``."""
    parser = argparse.ArgumentParser(prog="python -m cdi_experiments.run.paper")
    sub = parser.add_subparsers(dest="what", required=True)
    sig = sub.add_parser("signal", help="signal propagation at init -> <out>/" + SIGNAL_CSV)
    sig.add_argument("--out", type=Path, required=True)
    sig.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sig.add_argument("--depth", type=int, default=20)
    sig.add_argument("--width", type=int, default=256)
    sig.add_argument("--batch-size", type=int, default=256)
    bench = sub.add_parser("bench", help="the 1M-weight timing only -> <out>/" + BENCH_TXT)
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--repeats", type=int, default=5)
    build = sub.add_parser("build", help="tables, figures and RESULTS.md under <out>")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--command", default="")
    build.add_argument("--profile", default="full", choices=["full", "quick"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.what == "signal":
        path = signal_experiment(
            args.out,
            seeds=args.seeds,
            depth=args.depth,
            width=args.width,
            batch_size=args.batch_size,
        )
        print(path)
        return 0
    if args.what == "bench":
        print(one_million_bench(args.out, args.repeats).read_text(), end="")
        return 0
    paper = build_paper(args.out, args.command, args.profile)
    for c in paper.claims:
        print(f"{c.verdict:>24s}  {c.claim}: {c.measured}")
    print(
        f"{len(paper.tables)} table files, {len(paper.figures)} figure files, {args.out / RESULTS_MD}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
