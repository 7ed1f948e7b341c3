"""Run the fault-injection matrix (``tests/faults``) and print what each case expected and got.

    python scripts/faults_report.py [-k EXPR] [--basetemp DIR]

One row per case (kill moment, signal, bad checkpoint...): case, expected, observed, pass or
fail, then the last line ``faults <passed>/<total>``. Exit status 0 only if every case passed
(a case skipped, e.g. no tmpfs without root, counts as not passed). Each test records its own
case, expectation and observation (``case.expect``/``case.observe`` in tests/faults/conftest.py);
a failure's observation ends with the assertion that failed.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (30, 44, 56, 4)
MARK = {"passed": "pass", "failed": "FAIL", "skipped": "skip"}


class Recorder:
    """A pytest plugin keeping each test's outcome and its matrix properties."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        row = self.rows.setdefault(report.nodeid, {"outcome": "passed"})
        # Every phase's report carries all the properties recorded so far.
        observed = [value for key, value in report.user_properties if key == "observed"]
        row.update((k, v) for k, v in report.user_properties if k != "observed")
        if observed:
            row["observed"] = "; ".join(observed)
        if report.failed or report.skipped:
            row["outcome"] = "skipped" if report.skipped else "failed"
            why = _reason(report)
            if why:
                row["why"] = why

    def table(self) -> tuple[list[str], int, int]:
        lines = [_row(("case", "expected", "observed", "ok")), _row(tuple("-" * w for w in WIDTHS))]
        passed = 0
        for nodeid, row in self.rows.items():
            ok = row["outcome"] == "passed"
            passed += ok
            observed = row.get("observed", "")
            if not ok and row.get("why"):
                observed = f"{observed} | {row['outcome']}: {row['why']}".lstrip(" |")
            case = row.get("case") or nodeid.split("::")[-1]
            lines.append(
                _row((case, row.get("expected", ""), observed or "-", MARK[row["outcome"]]))
            )
        return lines, passed, len(self.rows)


def _reason(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        first = crash.message.splitlines()[0] if crash.message else ""
        return " ".join(first.split())[:160]
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])
    return " ".join(str(report.longrepr).split())[-200:]


def _row(cells: tuple[str, ...]) -> str:
    wrapped = [textwrap.wrap(c, w) or [""] for c, w in zip(cells, WIDTHS, strict=True)]
    height = max(len(w) for w in wrapped)
    return "\n".join(
        "  ".join(
            f"{(w[i] if i < len(w) else ''):{width}s}"
            for w, width in zip(wrapped, WIDTHS, strict=True)
        ).rstrip()
        for i in range(height)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-k", default=None, help="run only the cases matching (pytest -k)")
    parser.add_argument("--tb", default="no", help="pytest's traceback style (default: none)")
    parser.add_argument("--basetemp", default=None, help="keep the runs' directories here")
    args = parser.parse_args(argv)
    pytest_args = [str(REPO / "tests" / "faults"), "-m", "faults", "-q", "-p", "no:cacheprovider"]
    pytest_args += [f"--tb={args.tb}"]
    pytest_args += ["-k", args.k] if args.k else []
    pytest_args += ["--basetemp", args.basetemp] if args.basetemp else []
    recorder = Recorder()
    start = time.monotonic()
    code = pytest.main(pytest_args, plugins=[recorder])
    lines, passed, total = recorder.table()
    print()
    print("\n".join(lines))
    print(f"wall time {time.monotonic() - start:.0f} s (pytest exit {int(code)})")
    print(f"faults {passed}/{total}")
    return 0 if total and passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
