"""``cdi-prune``: the command line (parse, call, exit code)."""

from __future__ import annotations

from cdi_experiments.run.prune_stage import main

if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["main"]
