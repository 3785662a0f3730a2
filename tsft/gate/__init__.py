"""TS-PEFT token gates, framework-free (plain torch + peft).

gates = add_token_gates(peft_model, GateConfig(lam=1e-5, s=1e-4))
thresholds = ThresholdOptimizer(gates)
for batch in loader:
    loss = peft_model(**batch).loss      # attention_mask in batch: padding is left out
    loss.backward()
    optimizer.step(); thresholds.step()   # once per optimizer step (after accumulation)
    optimizer.zero_grad()
print(sparsity_report(gates, split="train"))
"""

from tsft.gate.adapter import ParallelAdapterLayer, add_parallel_adapters
from tsft.gate.attach import add_token_gates, find_token_gates, remove_token_gates
from tsft.gate.config import GateConfig
from tsft.gate.gate import TokenGate
from tsft.gate.report import sparsity_report, sparsity_summary
from tsft.gate.threshold import ThresholdOptimizer

__all__ = [
    "GateConfig",
    "ParallelAdapterLayer",
    "ThresholdOptimizer",
    "TokenGate",
    "add_parallel_adapters",
    "add_token_gates",
    "find_token_gates",
    "remove_token_gates",
    "sparsity_report",
    "sparsity_summary",
]
