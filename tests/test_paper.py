"""The paper's pieces without training: signal propagation at init (recomputed independently),
the benchmark parser, and each source claim's verdict on tidy frames with known values."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from cdi_experiments.modules import init_module
from cdi_experiments.modules.signal import SIGNAL_COLUMNS, DeepMLP, measure_signal, signal_frame
from cdi_experiments.run import paper as P
from cdi_experiments.run.runs import Runs


def batch(n: int = 64, d: int = 784) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- signal


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_measure_signal_matches_a_plain_recomputation(activation: str) -> None:
    x, y = batch()
    model = DeepMLP(784, 10, depth=5, width=32, activation=activation)
    init_module(model, 3, "xavier")
    got = measure_signal(model, x, y)
    # independent: explicit matrices, autograd.grad on the pre-activations
    act = torch.tanh if activation == "tanh" else torch.relu
    ws = [
        (getattr(model, f"fc{k}").weight.detach(), getattr(model, f"fc{k}").bias.detach())
        for k in range(1, 6)
    ]
    ws = [(w.clone().requires_grad_(True), b) for w, b in ws]
    h, zs = x, []
    for k, (w, b) in enumerate(ws, start=1):
        z = h @ w.T + b
        zs.append(z)
        h = act(z) if k < 5 else z
    loss = torch.nn.functional.cross_entropy(h, y)
    grads = torch.autograd.grad(loss, zs + [w for w, _ in ws])
    assert list(got["layer"]) == [1, 2, 3, 4, 5]
    for k in range(5):
        z = zs[k].detach().double()
        a = (act(zs[k]) if k < 4 else zs[k]).detach().double()
        row = got.iloc[k]
        assert row["preact_std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-6)
        assert row["act_std"] == pytest.approx(float(a.std(unbiased=False)), rel=1e-6)
        assert row["grad_std"] == pytest.approx(
            float(grads[k].double().std(unbiased=False)), rel=1e-5
        )
        wg = grads[5 + k].double().std(unbiased=False)
        assert row["weight_grad_std"] == pytest.approx(float(wg), rel=1e-5)


def test_zero_init_kills_the_signal_and_he_keeps_relu_alive() -> None:
    x, y = batch(128)
    df = signal_frame(x, y, ["zeros", "he", "xavier"], activations=["relu"], depth=12, width=64)
    assert tuple(df.columns) == SIGNAL_COLUMNS
    assert len(df) == 3 * 12
    zeros = df[df["scheme"] == "zeros"]
    # all weights 0: every hidden activation is the (zero) bias, and no gradient reaches them
    assert (zeros[zeros["layer"] < 12]["act_std"] == 0).all()
    assert (zeros[zeros["layer"] < 12]["grad_std"] == 0).all()
    deep = df[df["layer"] == 11].set_index("scheme")["preact_std"]
    # He's variance 2/fan_in compensates ReLU's halving; Xavier's 2/(fan_in+fan_out) does not
    # (784 -> 64 first layer), so Xavier's deep pre-activations shrink by about 2**-10
    assert 0.3 < deep["he"] < 3.0
    assert deep["xavier"] < 0.1 * deep["he"]


def test_signal_frame_is_deterministic_per_seed() -> None:
    x, y = batch(32)
    a = signal_frame(x, y, ["he"], activations=["tanh"], seeds=[0, 1], depth=3, width=16)
    b = signal_frame(x, y, ["he"], activations=["tanh"], seeds=[0, 1], depth=3, width=16)
    pd.testing.assert_frame_equal(a, b)
    s0, s1 = (a[a["seed"] == s]["act_std"].to_numpy() for s in (0, 1))
    assert not (s0 == s1).all()
    with pytest.raises(ValueError, match=r"^signal_frame needs at least one of seeds; got none$"):
        signal_frame(x, y, ["he"], seeds=[], depth=3, width=16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 1}, "depth=1 is too small; use depth >= 2 (hidden layers + head)"),
        ({"width": 0}, "width=0 is not allowed; use a positive hidden width"),
        ({"activation": "gelu"}, "activation='gelu' is unknown; use one of tanh, relu"),
    ],
)
def test_deep_mlp_refuses_bad_shapes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        DeepMLP(**kwargs)
    assert str(exc.value) == message


# ----------------------------------------------------------------------------- benchmark

BENCH = """python 3.11.9, torch 2.14.1, numba 0.68.1, cpu count 2, threads torch=2 numba=2, backend auto -> numba
numba warm-up (compile or cache load, excluded from timings): 900 ms
best and median of 7 repeats, after one untimed call each

4096 x 4096 float32 He (16.78 M weights)
  ours: init_tensor (numba)              best    40.00 ms  median    41.00 ms     419.4 Mweights/s
  torch: kaiming_normal_(torch.empty)    best    90.00 ms  median    95.00 ms     186.4 Mweights/s

1000 x 1000 float32 He (1.00 M weights)
  ours: init_tensor (numba)              best     2.50 ms  median     2.70 ms     400.0 Mweights/s
  torch: kaiming_normal_(torch.empty)    best     5.25 ms  median     5.50 ms     190.5 Mweights/s
"""


def test_read_bench_takes_the_one_million_row(tmp_path) -> None:
    (tmp_path / "b.txt").write_text(BENCH)
    bench = P.read_bench(tmp_path / "b.txt")
    assert (bench.ours_ms, bench.torch_ms) == (2.5, 5.25)
    assert bench.header.startswith("python 3.11.9")
    claim = P.claim_speed(bench)
    assert claim.verdict == "fails"  # 2.5 ms is not under 1 ms
    assert "2.50 ms" in claim.measured
    assert P.read_bench(tmp_path / "missing.txt") is None
    (tmp_path / "bad.txt").write_text("no table here\n")
    assert P.read_bench(tmp_path / "bad.txt") is None


# ----------------------------------------------------------------------------- claims


def layers_frame(values: dict[tuple[str, int], dict[str, float]]) -> Runs:
    """A sleeping-experiment Runs whose last epoch has the given awake % per (optimizer, seed)."""
    rows = []
    for (opt, seed), params in values.items():
        run = f"r-{opt}-{seed}"
        for epoch in (-1, 0, 1):
            for param, awake in params.items():
                a = 0.0 if epoch == -1 else awake
                rows.append(
                    {
                        "run": run,
                        "seed": seed,
                        "data": "mnist",
                        "model": "mlp",
                        "optimizer": opt,
                        "data.normalize": True,
                        "epoch": epoch,
                        "param": param,
                        "threshold": 1e-5,
                        "awake_pct": a,
                        "sleeping_pct": 100 - a,
                    }
                )
    layers = pd.DataFrame(rows)
    runs = layers.drop_duplicates("run")[["run", "seed", "data", "model", "optimizer"]]
    runs = runs.assign(**{"trainer.max_epochs": 2, "data.limit": 1000})
    empty = pd.DataFrame()
    return Runs(runs, layers, empty, empty, empty, empty)


def test_sleeping_and_input_layer_claims() -> None:
    runs = layers_frame(
        {
            ("sgd", 0): {"all": 35.0, "fc1.weight": 30.0, "fc2.weight": 50.0},
            ("sgd", 1): {"all": 37.0, "fc1.weight": 31.0, "fc2.weight": 52.0},
            ("adam", 0): {"all": 99.0, "fc1.weight": 99.5, "fc2.weight": 98.0},
        }
    )
    sleeping = P.claim_sleeping(runs)
    # sgd: 65 and 63 % sleeping (mean 64: inside 60-70); adam: 1 %
    assert sleeping.verdict == "holds in 1 of 2 settings"
    assert "sleeping: mnist mlp sgd normalized: 64.00 % ± 1.41 % (n=2) sleeping" in sleeping.detail
    assert "1.00 % to 64.00 % sleeping" in sleeping.measured
    assert sleeping.settings == "sleeping: epochs 2; training images 1000; seeds 0, 1"
    layer = P.claim_input_layer(runs)
    # fc1 has the largest awake share only in the adam run
    assert layer.verdict == "holds in 1 of 3 runs"
    tied = layers_frame({("adam", 0): {"all": 100.0, "fc1.weight": 100.0, "fc2.weight": 100.0}})
    claim = P.claim_input_layer(tied)
    assert claim.verdict == "fails" and "(1 tied with another layer)" in claim.detail


def test_prune_cost_claim() -> None:
    rows = []
    for seed, (before, after) in enumerate([(0.9000, 0.8995), (0.9100, 0.9098)]):
        for variant, acc in (("one-shot", after), ("fine-tuned", 0.5)):
            rows.append(
                {
                    "run": f"r{seed}",
                    "seed": seed,
                    "data": "mnist",
                    "data.normalize": False,
                    "criterion": "sleeping",
                    "target": "matched@1e-05",
                    "sparsity": 0.1,
                    "variant": variant,
                    "acc_before": before,
                    "acc": acc,
                }
            )
    prune = pd.DataFrame(rows)
    runs = prune.drop_duplicates("run")[["run", "seed"]]
    e = pd.DataFrame()
    claim = P.claim_prune_cost(Runs(runs, e, e, prune, e, e))
    assert claim.verdict == "holds in 1 of 1 settings"  # costs 0.0005 and 0.0002
    assert "cost 0.0004 ± 0.0002 (n=2)" in claim.detail
    assert "at sparsity 10.00 % ± 0.00 % (n=2)" in claim.detail


def init_runs(accs: dict[str, list[float]], data: str = "mnist") -> Runs:
    rows = [
        {"run": f"{init}-{s}", "seed": s, "data": data, "init": init, "test/acc": a, "val/acc": a}
        for init, values in accs.items()
        for s, a in enumerate(values)
    ]
    e = pd.DataFrame()
    return Runs(pd.DataFrame(rows), e, e, e, e, e)


def test_init_claims() -> None:
    demo = init_runs(
        {
            "torch_default": [0.97, 0.96],
            "zeros": [0.1135, 0.1135],
            "he+fc1=zeros": [0.2, 0.3],
            "ones": [0.1, 0.1],
        }
    )
    fashion = init_runs(
        {"zeros": [0.30, 0.32], "he": [0.85, 0.86], "xavier": [0.86, 0.87]}, "fashion_mnist"
    )
    zero = P.claim_zero_init(demo, fashion)
    assert zero.verdict == "mixed"  # at chance on MNIST, 0.31 on FashionMNIST
    one = P.claim_one_zero_layer(demo)
    assert one.verdict == "holds" and "0.2500 ± 0.0707 (n=2)" in one.detail
    he = P.claim_he_xavier(fashion, pd.DataFrame())
    assert he.verdict == "fails" and "difference -0.0100" in he.detail  # beyond std 0.0071
    close = init_runs({"he": [0.85, 0.87], "xavier": [0.86, 0.86]}, "fashion_mnist")
    he = P.claim_he_xavier(close, pd.DataFrame())
    assert he.verdict == "no difference beyond seed noise"
    assert P.claim_one_zero_layer(None).verdict == "not measured"


def test_pm_formats_mean_std_and_single_values() -> None:
    assert P.pm(0.5, 0.01, 3) == "0.5000 ± 0.0100 (n=3)"
    assert P.pm(0.5, math.nan, 1) == "0.5000 (n=1)"
    assert P.pm(math.nan, math.nan, 0) == "n/a"


def test_signal_experiment_on_real_images_is_kept_once_written(tmp_path) -> None:
    kw = {"seeds": (0,), "depth": 3, "width": 8, "schemes": ("he", "zeros"), "batch_size": 32}
    path = P.signal_experiment(tmp_path, **kw)
    assert path == tmp_path / P.SIGNAL_CSV
    df = pd.read_csv(path)
    assert list(df.columns) == ["dataset", *SIGNAL_COLUMNS]
    assert len(df) == 2 * 2 * 3  # activations x schemes x layers
    assert set(df["dataset"]) == {"mnist"}
    stamp = path.stat().st_mtime_ns
    assert P.signal_experiment(tmp_path, **kw) == path
    assert path.stat().st_mtime_ns == stamp  # same settings: not measured again
    P.signal_experiment(tmp_path, **{**kw, "seeds": (0, 1)})
    assert sorted(pd.read_csv(path)["seed"].unique()) == [0, 1]


@pytest.mark.integration
def test_weight_histograms_from_a_real_run(tmp_path) -> None:
    """Signed weight histograms at init and at the last epoch, recomputed with numpy from an
    independent init of the same architecture and from the checkpoint's own tensors."""
    import contextlib
    import copy
    import io

    import numpy as np
    from conftest import quick_cfg

    from cdi_experiments.run import train as train_mod

    cfg = quick_cfg(tmp_path / "run", "trainer.max_epochs=2", "prune=off", "test_after_fit=false")
    with contextlib.redirect_stdout(io.StringIO()):
        _, objects = train_mod.train(cfg)
    hist = P.weight_histograms(cfg.run_dir, bins=20)
    assert set(hist["kind"]) == {"weight"} and sorted(hist["epoch"].unique()) == [-1, 1]
    fresh = copy.deepcopy(objects["model"].model)  # the trained net, initialized again
    init_module(fresh, int(cfg.seed), str(cfg.init.scheme))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    for name, w0 in fresh.named_parameters():
        g = hist[hist["param"] == name]
        edges = np.append(g[g["epoch"] == 1]["low"].to_numpy(), g["high"].max())
        for epoch, values in ((-1, w0), (1, ckpt["state_dict"][f"model.{name}"])):
            want = np.histogram(values.detach().double().numpy().reshape(-1), bins=edges)[0]
            assert (g[g["epoch"] == epoch]["count"].to_numpy() == want).all(), (name, epoch)
