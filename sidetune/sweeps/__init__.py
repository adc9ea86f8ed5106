"""Sweeps: many configurations trained from one cache (or one per task) in one process.

- `grid`: the configurations of a sweep, checked, and each method's default grid.
- `estimate`: the wall time a sweep will take, from one timed step per group.
- `journal`: the rows of finished configurations, journaled so an interrupted sweep resumes.
- `protocol`: `sweep` itself (the validation protocol by split roles, or one split pair; stacks, ranks).
- `halving`: successive halving inside a stack.
- `report`: the result files and the `sidetune train` command of the best configuration.
- `suite`: the same sweep on every task's cache, and the VTAB-1k summary."""

from sidetune.sweeps.estimate import estimate_seconds
from sidetune.sweeps.grid import default_grid, expand_grid, load_grid, sweep_configs
from sidetune.sweeps.halving import Halving
from sidetune.sweeps.journal import SweepRow
from sidetune.sweeps.protocol import sweep, sweep_dir
from sidetune.sweeps.report import SweepReport, train_command
from sidetune.sweeps.suite import SuiteReport, find_caches, sweep_sources, sweep_tasks

__all__ = ["Halving", "SuiteReport", "SweepReport", "SweepRow", "default_grid", "estimate_seconds", "expand_grid",
           "find_caches", "load_grid", "sweep", "sweep_configs", "sweep_dir", "sweep_sources", "sweep_tasks", "train_command"]
