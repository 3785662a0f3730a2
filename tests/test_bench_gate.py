"""scripts/bench_gate_overhead.py: the memory count (the timings are not tested: see the brief)."""

from __future__ import annotations

import torch

from tests.helpers import load_script


def test_saved_bytes_count_only_what_the_graph_still_holds():
    """A graph piece freed during the forward (as peft's DoRA builds for its detached weight norm)
    must not count, nor may a storage be counted twice."""
    saved = load_script("bench_gate_overhead").SavedTensorBytes()
    x = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        kept = x.exp()  # ExpBackward keeps its output: 4000 bytes
        dropped = x.exp().cos()  # keeps another 4000 bytes, twice (exp's output is cos's input) ...
        del dropped  # ... until this graph piece is freed
    assert saved.total() == 4000
    kept.sum().backward()
