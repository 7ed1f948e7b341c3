"""FSDP2 through ``cdi-train trainer=fsdp2`` on CPU (2 processes, gloo): the model is built on the
meta device, sharded in ``configure_model`` and each rank fills only its own shards from the
generator; the gathered weights equal the single-process init bit for bit, the per-epoch awake
counts (all-reduced over the shards) equal an offline single-process analysis of the saved
weights, and ``cdi-prune`` and a resume read the checkpoint, a full state dict or a DCP folder. A
DCP folder is read without running code from it. Bad ``trainer=fsdp2`` settings are one line.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import SHRINK, cli_ok, compose_cfg, run_cli
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback
from torch.distributed.tensor import DTensor

from cdi_experiments.cli.train import main
from cdi_experiments.lightning.callback import DeterministicInitCallback
from cdi_experiments.lightning.fingerprint import weights_fingerprint
from cdi_experiments.modules import analyze_module, canonical_named_parameters, init_module
from cdi_experiments.modules.plan import tensors_sha256
from cdi_experiments.paths import is_dcp_folder
from cdi_experiments.run.checkpoint import CheckpointError, load_checkpoint
from cdi_experiments.run.prune_stage import load_run, prune_checkpoint
from cdi_experiments.run.schema import ConfigError, check_config, task_config

TESTS = Path(__file__).resolve().parent
FSDP2 = ["trainer=fsdp2", "trainer.devices=2"]
# Each rank reports the weights it holds at fit start (this module, imported in the ranks).
PROBE = "+callbacks.probe._target_=test_fsdp2.ShardProbe"
# A checkpoint per epoch beside last.ckpt: the weights each epoch's logged counts came from.
EVERY_EPOCH = [
    "+callbacks.every._target_=pytorch_lightning.callbacks.ModelCheckpoint",
    "+callbacks.every.save_top_k=-1",
    "+callbacks.every.monitor=val/loss",  # (Lightning needs each ModelCheckpoint's key unique)
    "+callbacks.every.filename='{epoch}'",
]
THRESHOLDS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # configs' tracking.thresholds
PRUNE = {"criteria": ["sleeping", "magnitude"], "sparsities": [0.5]}
PRUNE_ARGS = ["prune.criteria=[sleeping,magnitude]", "prune.sparsities=[0.5]"]


class ShardProbe(Callback):
    """Test-only, inside the rank processes: at fit start (after the init callback filled the
    shards, before any step) each rank writes ``rank<k>_probe.json``: the fingerprint of the
    gathered weights, how many elements of them it holds itself, and how many times a layer's
    own ``reset_parameters`` (a random init) ran after setup, when the model was still on the
    meta device (Lightning's materialization would call it)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.resets = 0
        for cls in {c for m in pl_module.model.modules() for c in type(m).__mro__}:
            own = vars(cls).get("reset_parameters")  # where it is defined (Conv2d: _ConvNd)
            if own is not None:
                cls.reset_parameters = self._counting(own)

    def _counting(self, reset):
        def counted(module, *args, **kwargs):
            self.resets += 1
            return reset(module, *args, **kwargs)

        return counted

    def on_fit_start(self, trainer, pl_module) -> None:
        init = next(c for c in trainer.callbacks if isinstance(c, DeterministicInitCallback))
        params = dict(canonical_named_parameters(pl_module.model))
        names = init.plan.names()
        gathered = [(n, params[n].full_tensor()) for n in names]  # collective, every rank
        local = sum(params[n].to_local().numel() for n in names)
        report = {
            "fingerprint": tensors_sha256(gathered),
            "all_dtensors": all(isinstance(params[n], DTensor) for n in names),
            "local": local,
            "total": sum(t.numel() for _, t in gathered),
            "resets": self.resets,
        }
        out = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}_probe.json"
        out.write_text(json.dumps(report))


def fsdp2_run(tmp_path: Path, *overrides: str) -> Path:
    """``cdi-train trainer=fsdp2 trainer.devices=2`` (shrunk) into ``tmp_path/run``."""
    run = tmp_path / "run"
    shrink = [a for a in SHRINK if not a.startswith("trainer.max_epochs")]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    args = [*shrink, *FSDP2, PROBE, *overrides, f"hydra.run.dir={run}"]
    proc = cli_ok(run_cli(args, cwd=tmp_path, env=env, timeout=240))
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    return run


def single_process_fingerprint(run: Path) -> str:
    """The same model built whole in this process and given init_module's weights (seed 0,
    he: the config's defaults): the fingerprint of those weights."""
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt", fix="")
    model = instantiate(ckpt["hyper_parameters"]["model_cfg"])
    plan = init_module(model, seed=0, scheme="he")
    return weights_fingerprint(model, plan.names())


def assert_init_is_the_single_process_one(run: Path) -> None:
    single = single_process_fingerprint(run)
    probes = [json.loads((run / f"rank{k}_probe.json").read_text()) for k in range(2)]
    for p in probes:
        assert p["fingerprint"] == single  # the gathered shards: bit for bit
        assert p["all_dtensors"] and 0 < p["local"] < p["total"]  # each rank a part only
        assert p["resets"] == 0  # no random init was drawn into the shards first
    assert sum(p["local"] for p in probes) == probes[0]["total"]  # FSDP2: no element twice
    info = json.loads((run / "run_info.json").read_text())
    assert info["generator"]["fingerprint"] == single
    # epoch -1: the analysis of the filled shards against the regenerated w0 found no
    # element that differs, out of every element of every tensor
    start = pd.read_csv(run / "layer_changes.csv").query("epoch == -1").set_index("name")
    assert start.loc["all", "numel"] == probes[0]["total"]
    assert (start["max_delta"] == 0).all() and (start["awake_pct@0"] == 0).all()


def assert_rows_match_offline_analysis(rows: pd.DataFrame, ckpt: Path) -> None:
    """The logged rows of one epoch equal analyze_module, in this process, on the weights the
    checkpoint holds (gathered into one model by load_run): counts exact, max exact."""
    model, plan, _ = load_run(ckpt)
    offline = analyze_module(model, plan, THRESHOLDS).set_index("name")
    rows = rows.set_index("name")
    assert sorted(rows.index) == sorted([*plan.names(), "all"])
    for name in rows.index:
        ref = offline.loc["__total__" if name == "all" else name]
        assert rows.loc[name, "numel"] == ref["numel"]
        for t in THRESHOLDS:
            assert rows.loc[name, f"awake_pct@{t:g}"] == ref[f"awake_pct@{t:g}"], (name, t)
        assert rows.loc[name, "max_delta"] == ref["max_delta"]
        assert rows.loc[name, "mean_delta"] == pytest.approx(ref["mean_delta"], rel=1e-12)


def assert_prunes(run: Path, ckpt: Path) -> pd.DataFrame:
    """cdi-prune's work on ``ckpt``; its table, after checking it evaluated the run's weights."""
    outcome = prune_checkpoint(ckpt, PRUNE)
    table = pd.read_csv(outcome.results)
    test_acc = pd.read_csv(run / "metrics.csv")["test/acc"].dropna().item()
    # cdi-prune evaluates the checkpoint's weights on the whole test set: the run's test/acc
    assert table["acc_before"].tolist() == pytest.approx([test_acc] * len(table))
    assert set(table["criterion"]) == {"sleeping", "magnitude"}
    return table


@pytest.mark.integration
def test_fsdp2_mlp_init_awake_counts_and_prune(tmp_path: Path) -> None:
    run = fsdp2_run(tmp_path, "trainer.max_epochs=2", *PRUNE_ARGS, *EVERY_EPOCH)
    assert_init_is_the_single_process_one(run)
    layers = pd.read_csv(run / "layer_changes.csv")
    for epoch in (0, 1):
        ckpt = run / "checkpoints" / f"epoch={epoch}.ckpt"
        assert_rows_match_offline_analysis(layers.query(f"epoch == {epoch}"), ckpt)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and not is_dcp_folder(last)  # one full state dict
    # The run's own prune stage (rank 0, on the model gathered back after fit) and cdi-prune
    # on the checkpoint prune the same weights against the same w0: the same table.
    in_run = pd.read_csv(run / "prune_results.csv")
    pd.testing.assert_frame_equal(assert_prunes(run, last), in_run)


@pytest.mark.integration
def test_fsdp2_cnn_distributed_checkpoint_and_resume(tmp_path: Path) -> None:
    args = ["prune=off", "model=cnn", "trainer.strategy.save_distributed_checkpoint=true"]
    run = fsdp2_run(tmp_path, *args, "trainer.max_epochs=1")
    assert_init_is_the_single_process_one(run)
    last = run / "checkpoints" / "last.ckpt"
    assert is_dcp_folder(last)
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # written beside it and swapped in: nothing else is left in checkpoints/
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    layers = pd.read_csv(run / "layer_changes.csv")
    assert_rows_match_offline_analysis(layers.query("epoch == 0"), last)
    assert_prunes(run, last)

    # The same command with one epoch more resumes from the DCP folder (read safely first)
    fsdp2_run(tmp_path, *args, "trainer.max_epochs=2")
    assert f"resuming from {last}" in (run / "train.log").read_text()
    layers = pd.read_csv(run / "layer_changes.csv")
    assert sorted(set(layers["epoch"])) == [-1, 0, 1]  # the first run's rows, and one more
    assert_rows_match_offline_analysis(layers.query("epoch == 1"), last)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl)")
def test_fsdp2_on_gpus_same_init_and_counts(tmp_path: Path) -> None:
    # The same config on GPUs: Lightning picks nccl for process_group_backend=null.
    run = fsdp2_run(tmp_path, "prune=off", "trainer.accelerator=gpu", "trainer.max_epochs=1")
    assert_init_is_the_single_process_one(run)
    layers = pd.read_csv(run / "layer_changes.csv")
    assert_rows_match_offline_analysis(layers.query("epoch == 0"), run / "checkpoints/last.ckpt")


class _BuildsInConfigureModel(pl.LightningModule):
    """A LightningModule that creates its network in ``configure_model`` (Lightning's way for
    sharded models), here under the default single-device strategy."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_built_in_configure_model_gets_the_init(tmp_path: Path) -> None:
    # setup() runs before configure_model: the callback waits for the model, then tracks it
    cb = DeterministicInitCallback(seed=3, scheme="he", out_dir=str(tmp_path))
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    lit = _BuildsInConfigureModel()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=4))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    plan = init_module(reference, seed=3, scheme="he")
    assert cb.plan.names() == plan.names() == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert cb.fingerprint == weights_fingerprint(reference, plan.names())
    start = pd.read_csv(tmp_path / "layer_changes.csv").query("epoch == -1")
    assert (start["max_delta"] == 0).all()  # the trained model started from exactly those


# ----------------------------------------------------------------------------- DCP, safely


def _dcp_folder(path: Path) -> dict[str, torch.Tensor]:
    """A small DCP checkpoint folder as Lightning writes one (index, shards file, meta.pt)."""
    import torch.distributed.checkpoint as dcp

    weights = {"model.fc.weight": torch.arange(12.0).reshape(3, 4), "model.fc.bias": torch.ones(3)}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"state_dict": weights}, checkpoint_id=str(path), no_dist=True)
    plan = {"seed": 0, "scheme": "he", "generator_version": 1, "blocks": {}}
    meta = {"epoch": 0, "callbacks": {"DeterministicInitCallback": {"plan": plan}}}
    torch.save(meta, path / "meta.pt")
    return weights


def test_dcp_folder_loads_as_one_checkpoint(tmp_path: Path) -> None:
    weights = _dcp_folder(tmp_path / "last.ckpt")
    ckpt = load_checkpoint(tmp_path / "last.ckpt", fix="FIX")
    assert ckpt["epoch"] == 0 and sorted(ckpt["state_dict"]) == sorted(weights)
    for key, value in weights.items():
        assert torch.equal(ckpt["state_dict"][key], value)


def test_dcp_folder_with_a_missing_shard_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    _dcp_folder(folder)
    index = pickle.loads((folder / ".metadata").read_bytes())  # (our own file: trusted here)
    index.state_dict_metadata["state_dict.model.fc.weight"].chunks.clear()
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(folder, fix="FIX")
    assert str(exc.value) == (
        f"{folder}: the shards of 'state_dict.model.fc.weight' hold 0 of its 12 elements; FIX"
    )


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_index_that_would_run_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    _dcp_folder(folder)
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(folder, fix="FIX")
    assert str(exc.value) == (
        f"{folder / '.metadata'} is not a safe checkpoint index: it would call posix.system, "
        "which this reader refuses (not written by cdi-train; do not load it otherwise); FIX"
    )
    assert not marker.exists()


def test_dcp_meta_that_would_run_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    _dcp_folder(folder)
    marker = tmp_path / "PWNED"
    torch.save({"x": _RunsCode(marker)}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt is not a safe checkpoint: it would call"):
        load_checkpoint(folder, fix="FIX")
    assert not marker.exists()


# ----------------------------------------------------------------------------- config

ERR = "cdi-train: error: "
BAD = {
    "trainer.strategy.tensor_parallel_size=2": (
        "trainer.strategy.tensor_parallel_size=2 is not allowed; the Classifier shards with "
        "FSDP2 only (no tensor parallelism): use 1"
    ),
    "trainer.devices=3 trainer.strategy.data_parallel_size=2": (
        "trainer.strategy.data_parallel_size=2 is not allowed; FSDP2 shards over every device: "
        "use trainer.devices x trainer.num_nodes = 3 (trainer=fsdp2 sets it to ${trainer.devices})"
    ),
    "trainer.strategy.process_group_backend=nccl": (
        "trainer.strategy.process_group_backend='nccl' is not allowed; nccl needs GPUs: on "
        "trainer.accelerator=cpu use gloo, or null (gloo on CPU, nccl on GPUs)"
    ),
    "trainer.strategy.process_group_backend=mpi": (
        "trainer.strategy.process_group_backend='mpi' is not allowed; choose one of: null, "
        "gloo, nccl"
    ),
    "+trainer.strategy.save_distributed_chekpoint=true": (
        "trainer.strategy.save_distributed_chekpoint=True is not allowed: "
        "cdi_experiments.lightning.checkpoint_io.AtomicModelParallelStrategy takes no argument "
        "'save_distributed_chekpoint'; did you mean trainer.strategy.save_distributed_checkpoint?"
    ),
    "trainer.devices=auto": (
        "trainer.devices='auto' is not allowed; trainer=fsdp2 needs a number of devices, e.g. 2"
    ),
    "init.mode=record": (
        "init.mode='record' is not allowed; trainer=fsdp2 builds the model on the meta device, "
        "so it has no init of its own to record: use init.mode=generate"
    ),
    "init.biases=false": (
        "init.biases=False is not allowed; trainer=fsdp2 builds the model on the meta device, "
        "where only the init gives the biases values: use init.biases=true"
    ),
    "init=lsuv": "init.scheme='lsuv' is not allowed; LSUV fits each layer's scale with forward",
}


@pytest.mark.parametrize("args", list(BAD))
def test_bad_fsdp2_setting_is_one_line(
    args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [*FSDP2, *args.split(), f"hydra.run.dir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(ERR + BAD[args]), line
    assert sorted(tmp_path.iterdir()) == []  # nothing written


def test_fsdp2_config_is_accepted_as_shipped() -> None:
    cfg = task_config(compose_cfg(FSDP2))
    check_config(cfg)
    strategy = cfg.trainer.strategy
    assert strategy.data_parallel_size == 2 and strategy.tensor_parallel_size == 1
    assert strategy.process_group_backend is None  # Lightning: gloo on CPU, nccl on CUDA
    with pytest.raises(ConfigError, match=r"^trainer\.strategy\.data_parallel_size=2 is not"):
        check_config(
            task_config(
                compose_cfg([*FSDP2, "trainer.strategy.data_parallel_size=2", "trainer.devices=4"])
            )
        )
