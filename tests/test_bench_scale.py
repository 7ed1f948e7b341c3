"""``scripts/bench_scale.py --quick`` runs end to end and prints its documented lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_scale.py"
RATIO = r"ratio (\d+\.\d+)"


@pytest.mark.integration
def test_bench_scale_quick_prints_every_line_with_a_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("cpu ") and "logical cpus" in lines[0]
    assert re.fullmatch(r"flags .* \(avx2=(True|False), avx512=(True|False)\)", lines[1])
    assert re.match(r"threads torch=2 numba=2 ", lines[2])
    shard = [ln for ln in lines if ln.startswith("shard world=")]
    assert [int(re.match(r"shard world=(\d+)", ln)[1]) for ln in shard] == [1, 2, 4]
    for ln in shard:
        world = int(re.match(r"shard world=(\d+)", ln)[1])
        assert len(re.findall(r"\br\d+ \d+ ms rss\+\d+ MiB numpy-peak", ln)) == world
        assert re.search(RATIO + r"$", ln)
    assert float(re.search(RATIO, shard[0])[1]) == 1.0  # the 1-rank run is the reference
    res = [ln for ln in lines if ln.startswith("resnet18 init_module")]
    assert [re.match(r"resnet18 init_module scheme=(\w+)", ln)[1] for ln in res] == [
        "he",
        "torch_default",
    ]
    for ln in res:
        assert re.search(r"torch reset_parameters \d+ ms, " + RATIO + "$", ln)
    (ana,) = [ln for ln in lines if ln.startswith("analysis ")]
    assert "2.0 M params (materialized model, analyze_module)" in ana
    assert re.search(r"kaiming_normal_ \d+\.\d+ s, " + RATIO + "$", ana)
    last = re.fullmatch(r"ratio (\d+\.\d{3})", lines[-1])
    assert last and float(last[1]) == pytest.approx(float(re.search(RATIO, ana)[1]), abs=0.01)
    assert float(last[1]) > 0


@pytest.mark.integration
def test_bench_scale_streams_past_materialize_max() -> None:
    """Above ``--materialize-max`` the analysis never builds the model (the --params 1e9 path)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--worlds", "1", "--materialize-max", "1e6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ana,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("analysis ")]
    assert "2.0 M params (streamed chunks, delta_summary)" in ana
    assert re.fullmatch(r"ratio \d+\.\d{3}", proc.stdout.strip().splitlines()[-1])
