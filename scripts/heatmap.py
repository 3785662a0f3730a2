"""Token heatmap of a finished TS run: which tokens each gated module updated, for a text you give.

python scripts/heatmap.py results/runs/glue/sst2/<run> --text "a gripping, beautifully acted film"
python scripts/heatmap.py results/runs/glue/mrpc/<run> --text "..." --text-pair "..." --out my_heatmap

Writes <out>.html (tokens coloured by the share of gated modules that were on; hover for each layer) and
<out>.png (layers x tokens, and every module x tokens); <out> defaults to <run>/heatmap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--text", required=True)
    parser.add_argument("--text-pair", help="the second sentence of a sentence-pair task (MRPC, STS-B, RTE, ...)")
    parser.add_argument("--out", type=Path, help="path without suffix (default: <run_dir>/heatmap)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "adapter").is_dir():
        print(f"error: {args.run_dir / 'adapter'} does not exist: pass the folder of a finished run", file=sys.stderr)
        return 2
    from tsft.analysis.heatmap import token_decisions, write_heatmap_html, write_heatmap_png
    from tsft.integrations.run_adapter import load_run

    model, tokenizer, cfg = load_run(args.run_dir)
    try:
        decisions = token_decisions(model, tokenizer, args.text, args.text_pair)
    except ValueError as err:
        print(f"error: {args.run_dir} — {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "heatmap"
    gates = f"λ {cfg.sparsity['lambda']:g}, s {cfg.sparsity.s:g}"
    title = f"{cfg.task.name} · {cfg.peft.name} + gates ({gates}) · {cfg.model.name}"
    html_path = write_heatmap_html(decisions, out.with_suffix(".html"), title)
    png_path = write_heatmap_png(decisions, out.with_suffix(".png"), title)
    updated = 100 * float(decisions.on.float().mean())
    print(f"{html_path}\n{png_path}\nshare of (module, token) pairs updated: {updated:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
