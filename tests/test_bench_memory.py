"""``metareg bench --memory``: how a worker that ran out of memory is reported."""

from __future__ import annotations

import pytest

from metareg.runs import bench_memory

# What learn2learn's MAML.adapt prints when the allocator fails inside it: it catches the RuntimeError,
# prints it, and then fails on a variable the failed call never bound.
LEARN2LEARN_OOM = """Traceback (most recent call last):
  File "learn2learn/algorithms/maml.py", line 159, in adapt
    gradients = grad(loss, diff_params, retain_graph=second_order, create_graph=second_order)
RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: \
you tried to allocate 14112000 bytes. Error code 12 (Cannot allocate memory)
learn2learn: Maybe try with allow_nograd=True and/or allow_unused=True ?
Traceback (most recent call last):
  File "learn2learn/algorithms/maml.py", line 171, in adapt
    self.module = maml_update(self.module, self.lr, gradients)
UnboundLocalError: cannot access local variable 'gradients' where it is not associated with a value
"""


def test_an_allocation_failure_anywhere_in_the_output_is_out_of_memory():
    """Measured on ResNet-12 at 10 inner steps: learn2learn's row said "failed: UnboundLocalError"
    while it had run out of the 16 GB heap. Mutation caught: reading the last line only."""
    assert bench_memory.ran_out_of_memory(LEARN2LEARN_OOM)
    assert bench_memory.ran_out_of_memory("MemoryError\n")
    assert bench_memory.ran_out_of_memory("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert not bench_memory.ran_out_of_memory("Traceback...\nValueError: expected 4 dimensions, got 3\n")


@pytest.mark.slow  # starts a process
def test_a_worker_beyond_its_heap_cap_is_reported_out_of_memory():
    """A real worker process under a heap cap below what it needs: its row is "out of memory" with
    the cap, not a failure with a traceback line."""
    settings = {"shape": "omniglot-20w1s", "device": "cpu", "steps": 1, "meta_batch": 1, "iterations": 1}
    row = bench_memory._run_worker("plain-loop", settings | {"memory_limit": 0.25}, None)
    assert (row["impl"], row["error"], row["limit_gb"]) == ("plain-loop", bench_memory.OOM, 0.25)
