"""Which tokens received the update: one evaluation pass of a gated model, each gate's decision per token.

    decisions = token_decisions(model, tokenizer, "a gripping film", text_pair=None)
    write_heatmap_html(decisions, "heatmap.html")   # tokens coloured by the share of gated modules that were on
    write_heatmap_png(decisions, "heatmap.png")     # layers x tokens (share of a layer's modules on); modules x tokens

The decisions are read where the gate makes them (``TokenGate._record`` of the evaluation split, the same
record the sparsity of Eq. 21 is counted from), so the picture and the run's sparsity cannot disagree.
"""

from __future__ import annotations

import html
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from tsft.gate.attach import find_token_gates
from tsft.gate.gate import TokenGate


@dataclass
class TokenDecisions:
    tokens: list[str]  # the input's tokens, as the tokenizer splits them
    modules: list[str]  # gated module names, in model order
    layers: list[Optional[int]]  # each module's layer index (None: outside the numbered blocks)
    on: torch.Tensor  # bool (modules, tokens): the update was applied to that token in that module

    def share_on(self) -> torch.Tensor:
        """Per token, the share of gated modules that applied their update."""
        return self.on.float().mean(0)

    def by_layer(self) -> tuple[list[Optional[int]], torch.Tensor]:
        """(layers, (layers, tokens) share of each layer's gated modules that were on)."""
        rows: dict[Optional[int], list[int]] = defaultdict(list)
        for index, layer in enumerate(self.layers):
            rows[layer].append(index)
        order = sorted(rows, key=lambda layer: (layer is None, layer or 0))  # numbered layers first, in order
        return order, torch.stack([self.on[rows[layer]].float().mean(0) for layer in order])


@contextmanager
def recording_decisions(gates: list[TokenGate]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, every evaluation pass of ``gates`` also leaves its on-mask in the yielded {gate name: [masks]}.
    An instance attribute shadows ``_record`` for the duration only: the gate's class and hot path are untouched."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)

    def recorder(gate: TokenGate):
        original = TokenGate._record.__get__(gate)

        def record(split, mu, on, real, norms=None):
            if split == "eval":
                seen[gate.name].append(on.detach().cpu())
            original(split, mu, on, real, norms)

        return record

    for gate in gates:
        gate._record = recorder(gate)
    try:
        yield seen
    finally:
        for gate in gates:
            del gate._record


def token_decisions(model: nn.Module, tokenizer, text: str, text_pair: Optional[str] = None) -> TokenDecisions:
    """Run ``text`` (and ``text_pair``, for sentence-pair tasks) through the gated ``model`` once, in eval mode."""
    gates = find_token_gates(model)
    if not gates:
        raise ValueError("the model has no token gates: a heatmap shows a TS run's per-token decisions")
    batch = tokenizer(text, text_pair, return_tensors="pt")
    was_training = model.training
    model.eval()
    try:
        with recording_decisions(gates) as seen, torch.no_grad():
            model(**batch)
    finally:
        model.train(was_training)
    rows = []
    for gate in gates:
        if len(seen[gate.name]) != 1:
            raise RuntimeError(f"gate {gate.name} decided {len(seen[gate.name])} times in one pass (expected once)")
        rows.append(seen[gate.name][0].reshape(-1).bool())  # one sequence: one decision per position
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    return TokenDecisions(tokens, [g.name for g in gates], [g.layer for g in gates], torch.stack(rows))


def _short(name: str, layer: Optional[int]) -> str:
    """``L3 attention.self.query`` for ``base_model.model.bert.encoder.layer.3.attention.self.query``."""
    return name if layer is None else f"L{layer} {name.split(f'.{layer}.', 1)[-1]}"


def _colour(share: float) -> str:
    """White (no module on) to a saturated orange (every module on)."""
    r, g, b = 255, round(255 - share * (255 - 140)), round(255 - share * 255)
    return f"rgb({r},{g},{b})"


def write_heatmap_html(decisions: TokenDecisions, path: Path, title: str = "") -> Path:
    """A self-contained page: the tokens coloured by the share of gated modules on (hover: per layer), then the
    layers x tokens table."""
    layers, grid = decisions.by_layer()
    share = decisions.share_on()
    spans = []
    for index, token in enumerate(decisions.tokens):
        per_layer = ", ".join(f"L{layer}: {100 * float(grid[i, index]):.0f} %" for i, layer in enumerate(layers))
        spans.append(
            f'<span class="tok" style="background:{_colour(float(share[index]))}" '
            f'title="{html.escape(per_layer)}" data-share="{float(share[index]):.4f}">{html.escape(token)}</span>'
        )
    header = "".join(f"<th>{html.escape(t)}</th>" for t in decisions.tokens)
    body = "".join(
        f"<tr><th>layer {'—' if layer is None else layer}</th>"
        + "".join(f'<td style="background:{_colour(float(v))}">{100 * float(v):.0f}</td>' for v in grid[i].tolist())
        + "</tr>"
        for i, layer in enumerate(layers)
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or "TS-PEFT token heatmap")}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.tok {{ padding: 2px 3px; margin: 1px; border-radius: 3px; display: inline-block; font-family: monospace; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ddd; padding: 2px 4px; text-align: center; }}
</style></head><body>
<h2>{html.escape(title or "TS-PEFT token heatmap")}</h2>
<p>Colour: share of the {len(decisions.modules)} gated modules that applied their update to the token
(white 0 %, orange 100 %); hover a token for its share per layer. Overall share on:
{100 * float(share.mean()):.1f} %.</p>
<p class="tokens">{"".join(spans)}</p>
<h3>Share of each layer's gated modules on (%)</h3>
<table><tr><th></th>{header}</tr>{body}</table>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_heatmap_png(decisions: TokenDecisions, path: Path, title: str = "") -> Path:
    """Two panels over the tokens: layers (share of the layer's modules on) and every gated module (on / off)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, grid = decisions.by_layer()
    n_tokens, n_modules = len(decisions.tokens), len(decisions.modules)
    figure = Figure(figsize=(max(6.0, 0.38 * n_tokens + 2.5), 1.6 + 0.3 * len(layers) + 0.16 * n_modules))
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, height_ratios=[max(len(layers), 1), max(n_modules, 1) * 0.55], sharex=True)
    image = top.imshow(grid.numpy(), aspect="auto", cmap="Oranges", vmin=0, vmax=1, interpolation="nearest")
    top.set_yticks(range(len(layers)), [f"layer {'—' if layer is None else layer}" for layer in layers], fontsize=8)
    top.set_title(title or "share of each layer's gated modules that updated the token", fontsize=10)
    figure.colorbar(image, ax=top, fraction=0.03, pad=0.01, label="share on")
    bottom.imshow(decisions.on.float().numpy(), aspect="auto", cmap="Oranges", vmin=0, vmax=1, interpolation="nearest")
    labels = [_short(name, layer) for name, layer in zip(decisions.modules, decisions.layers)]
    bottom.set_yticks(range(n_modules), labels, fontsize=6)
    bottom.set_xticks(range(n_tokens), decisions.tokens, rotation=60, ha="right", fontsize=8)
    bottom.set_title("each gated module: update applied (dark) or skipped (light)", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
