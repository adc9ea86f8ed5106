"""Counting what a training step asks of the device: its compute ops, custom ops and Triton
launches, from torch's profiler (which sees every op, inside custom ops and autograd's backward
too).

A compute op is an aten op that runs a kernel of its own: not a view, an allocation or a
composite op (linear -> matmul -> mm counts mm once; a reshape that copies counts its copy), not
a wrapper whose sub-ops do the work (_to_copy, clone, zeros, ...; a CPU mean's sum and
division), and not arithmetic on 0-dim tensors alone (Python numbers wrapped by the CPU; on a
GPU they are kernel arguments). The
fill_ a CPU reduction runs on its output first is not counted either: GPU reductions have none.
Each Triton launch (every one goes through sidetune.kernels.launch) counts once, whatever it
does underneath (under the interpreter, numpy and argument copies). On a GPU every compute op
and launch is a kernel launch, so the sum models what a step launches there."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sidetune.kernels import launch as triton_launch

TRITON_PREFIX = "triton::"
NO_KERNEL = {"_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "lift_fresh",
             "detach", "detach_", "alias", "set_", "result_type", "is_nonzero", "size", "stride", "dim", "numel"}
WRAPPERS = {"_to_copy", "to", "clone", "contiguous", "copy", "zeros", "zeros_like", "ones", "ones_like", "full",
            "full_like", "new_zeros", "new_ones", "new_full", "scalar_tensor", "select_backward", "slice_backward",
            "expand_backward", "gather_backward", "index_put", "type_as", "flatten", "reshape"}
# Ops the CPU runs as an op calling its own sub-ops, each one kernel on a GPU: count the sub-ops only.
SPLIT_ON_CPU = {"mean", "where", "logical_and_", "rsub"}
REDUCTIONS = {"sum", "mean", "var_mean", "var", "std", "argmax", "amax", "logsumexp", "nansum"}
HOST_SYNC = {"_local_scalar_dense", "item", "nonzero", "is_nonzero"}


@dataclass
class StepCount:
    """What one step dispatched (averaged over the counted steps)."""

    compute_ops: float  # aten ops that run a kernel, outside Triton launches
    triton_launches: float
    custom_ops: float  # sidetune:: custom ops called (each holds compute ops or launches)
    host_syncs: float  # ops that make the host wait for the device (.item(), nonzero, ...)
    by_op: Counter = field(default_factory=Counter)

    @property
    def launches(self) -> float:
        """Kernel launches on a GPU: compute ops plus Triton launches."""
        return self.compute_ops + self.triton_launches

    def row(self) -> dict:
        return {"compute_ops": self.compute_ops, "triton_launches": self.triton_launches, "launches": self.launches,
                "custom_ops": self.custom_ops, "host_syncs": self.host_syncs}


def _runs_a_kernel(name: str) -> bool:
    op = name.removeprefix("aten::")
    packet = getattr(torch.ops.aten, op, None)
    if op in NO_KERNEL or packet is None:
        return False
    for overload_name in packet.overloads():  # the profiler names the op, not its overload: the first that exists
        overload = getattr(packet, overload_name)
        try:
            composite = overload.has_kernel_for_dispatch_key("CompositeImplicitAutograd")
        except RuntimeError:
            continue
        # a composite op with no aten op beneath it did nothing of its own (reshape of a contiguous tensor)
        return not overload.is_view and not composite
    return False


@contextmanager
def _named_launch(name: str):
    with record_function(TRITON_PREFIX + name):
        yield


def count_steps(step: Callable[[], None], steps: int = 2) -> StepCount:
    """Run `step` `steps` times under the profiler and count what each dispatched."""
    triton_launch.observers.append(_named_launch)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as recorded:
            for _ in range(steps):
                step()
    finally:
        triton_launch.observers.remove(_named_launch)
    counts, launches, custom, syncs = Counter(), 0, 0, 0

    def visit(event, parent: str = "") -> int:
        """Count `event`'s compute ops: those beneath it, and its own kernel."""
        nonlocal launches, custom, syncs
        name = event.name.removeprefix("aten::")
        if event.name.startswith(TRITON_PREFIX):
            launches += 1
            return 1  # what the launch did underneath is the launch
        if event.name.startswith("sidetune::"):
            custom += 1
        if name in HOST_SYNC:
            syncs += 1
        below = sum(visit(child, name) for child in event.cpu_children)
        if not event.name.startswith("aten::") or not _runs_a_kernel(name) or (name in WRAPPERS | SPLIT_ON_CPU and below):
            return below
        scalars_only = all(shape == [] for shape in event.input_shapes)
        if scalars_only or (name in ("fill_", "zero_") and parent in REDUCTIONS):
            return below
        counts[name] += 1
        return below + 1

    for event in recorded.events():
        if event.cpu_parent is None:
            visit(event)
    return StepCount(sum(counts.values()) / steps, launches / steps, custom / steps, syncs / steps,
                     Counter({name: n / steps for name, n in counts.items()}))
