"""A corrupt MNIST file (a copy of the data directory, ``CDI_DATA_DIR``): re-fetched with a
WARNING naming the file and its bad checksum; in a read-only directory, one line naming the
file and the fix."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from faults.common import REPO, error_line, one_line_problems, short, tail, train
from faults.conftest import remount

pytestmark = pytest.mark.faults

BAD_FILE = "train-labels-idx1-ubyte"  # 60 kB: small to copy, read by every run
QUICK = ["trainer.max_epochs=1", "prune=off"]


def corrupt_copy(root: Path) -> Path:
    """Copy MNIST under ``root``; flip bytes inside BAD_FILE (same size, wrong sha256)."""
    shutil.copytree(REPO / "data" / "MNIST", root / "MNIST")
    bad = root / "MNIST" / "raw" / BAD_FILE
    data = bytearray(bad.read_bytes())
    data[100:108] = b"garbage!"
    bad.write_bytes(bytes(data))
    return bad


def test_corrupt_data_file_refetched_with_warning(tmp_path: Path, case):
    case.expect(
        "corrupt data file",
        "WARNING naming the file and its bad sha256, re-fetched, run exit 0",
    )
    bad = corrupt_copy(tmp_path / "data")
    bad_sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    good_sha = hashlib.sha256((REPO / "data" / "MNIST" / "raw" / BAD_FILE).read_bytes()).hexdigest()
    proc = train(tmp_path / "run", *QUICK, CDI_DATA_DIR=str(tmp_path / "data"))
    warnings = [
        ln
        for ln in (proc.stdout + proc.stderr).splitlines()
        if "WARNING" in ln and BAD_FILE in ln and bad_sha[:8] in ln
    ]
    fixed = hashlib.sha256(bad.read_bytes()).hexdigest() == good_sha
    case.observe(
        f"exit {proc.returncode}, re-fetched {fixed}, "
        + (f"warning {short(warnings[0], 60)!r}" if warnings else "no WARNING naming file+sha")
    )
    assert proc.returncode == 0, tail(proc)
    assert fixed
    assert warnings, "no WARNING line naming the file and its bad checksum"


def test_corrupt_data_in_read_only_dir_one_line(tmp_path: Path, tmpfs, case):
    case.expect(
        "corrupt data, read-only dir",
        "exit!=0, one line naming the file and the fix, no traceback",
    )
    data = tmpfs("80m")
    bad = corrupt_copy(data)
    remount(data, "ro")
    proc = train(tmp_path / "run", *QUICK, CDI_DATA_DIR=str(data))
    line = error_line(proc)
    problems = one_line_problems(proc, BAD_FILE)
    if not any(w in line for w in ("cdi-data", "writable", "CDI_DATA_DIR")):
        problems.append("the line gives no fix (cdi-data fetch, a writable dir, CDI_DATA_DIR)")
    case.observe(f"exit {proc.returncode}, {short(line, 90)!r}")
    assert bad.exists()
    assert problems == [], problems
