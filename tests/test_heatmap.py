"""Token heatmaps (issue 20, part 3): the per-token decisions are the gate's own, and both renderings show them."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from tsft.analysis.heatmap import token_decisions, write_heatmap_html, write_heatmap_png
from tsft.gate import find_token_gates
from tsft.integrations.run_adapter import load_run
from tsft.pipeline import run

from .helpers import compose_config, load_script, tiny_overrides
from .test_merge_export import ALWAYS_OFF, ALWAYS_ON, TS, _force, _trained_run

TEXT, PAIR = "a man plays the guitar", "a woman sings quickly"


@pytest.fixture
def ts_run(tmp_path, data_dir):
    run_dir, _ = _trained_run(tmp_path, data_dir, ["peft=lora", *TS])
    return run_dir


def test_the_decisions_are_what_the_gates_counted(ts_run):
    model, tokenizer, _ = load_run(ts_run)
    gates = find_token_gates(model)
    # half the gates at their mean update ratio, so the decisions differ by token
    with torch.no_grad():
        for gate in gates[::2]:
            gate.tau.fill_(0.5)
    for gate in gates:
        gate.reset_stats("eval")
    decisions = token_decisions(model, tokenizer, TEXT, PAIR)
    assert decisions.on.shape == (10, len(decisions.tokens)) and decisions.tokens[0] == "[CLS]"
    assert [gate.counts("eval") for gate in gates] == [(int(row.sum()), len(decisions.tokens)) for row in decisions.on]
    assert all("_record" not in gate.__dict__ for gate in gates)  # the gates are themselves again
    layers, grid = decisions.by_layer()
    assert layers == [0, 1] and grid.shape == (2, len(decisions.tokens))
    torch.testing.assert_close(grid.mean(0), decisions.share_on())  # 5 modules per layer


@pytest.mark.parametrize("tau, share", [(ALWAYS_ON, 1.0), (ALWAYS_OFF, 0.0)])
def test_the_page_and_the_picture_show_the_shares(ts_run, tmp_path, tau, share):
    model, tokenizer, _ = load_run(ts_run)
    _force(model, [tau] * 10)
    decisions = token_decisions(model, tokenizer, TEXT)
    page = write_heatmap_html(decisions, tmp_path / "h.html", "title").read_text()
    shares = [float(v) for v in re.findall(r'data-share="([0-9.]+)"', page)]
    assert shares == [share] * len(decisions.tokens)
    assert page.count('<span class="tok"') == len(decisions.tokens)
    picture = write_heatmap_png(decisions, tmp_path / "h.png")
    from matplotlib.image import imread

    assert imread(picture).ndim == 3


def test_the_script_writes_both_files_and_refuses_a_dense_run(ts_run, tmp_path, data_dir, capsys):
    script = load_script("heatmap")
    out = tmp_path / "heat"
    assert script.main([str(ts_run), "--text", TEXT, "--text-pair", PAIR, "--out", str(out)]) == 0
    assert out.with_suffix(".html").is_file() and out.with_suffix(".png").is_file()
    dense, _ = run(compose_config([*tiny_overrides(tmp_path / "dense", data_dir), "task=glue/stsb", "peft=lora"]))
    assert script.main([str(dense), "--text", TEXT]) == 2
    assert "no token gates" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_a_real_browser_parses_the_page_into_one_coloured_span_per_token(ts_run, tmp_path):
    model, tokenizer, _ = load_run(ts_run)
    decisions = token_decisions(model, tokenizer, TEXT, PAIR)
    page = write_heatmap_html(decisions, tmp_path / "h.html", "title")
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    spans = re.findall(r'<span class="tok" style="background:(rgb\([0-9, ]+\))"', dom)
    assert len(spans) == len(decisions.tokens)
    assert dom.count("<tr>") == 1 + len(decisions.by_layer()[0])  # header row + one per layer
