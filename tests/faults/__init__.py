"""Fault-injection tier: kills, signals, concurrent writers, full disks, bad checkpoints,
corrupt data, NaN losses and relaunched sweeps, each against the real command-line tools.

    pytest -m faults tests/faults          # the tests
    python scripts/faults_report.py        # the matrix: case, expected, observed, pass/fail

Faults fire at exact moments from inside the run (:mod:`faults.hooks`, a Lightning callback
loaded with ``+callbacks.faults._target_=faults.hooks.FaultAt``), never after a sleep. Every
resumed run is compared file for file with one uninterrupted run of the same command
(:func:`faults.common.differences`, the logic of ``scripts/compare_runs.py``). Full disks are a
small tmpfs (root only; elsewhere an ENOSPC stand-in, or set ``CDI_FAULTS_NO_TMPFS=1``).
"""
