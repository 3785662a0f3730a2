"""Build the analyses' outputs from their runs (study `analysis`, tsft/report/analysis.py).

python scripts/make_analysis.py table4 --preset cpu                 # -> results/tables/table4_cpu.{md,tex}
python scripts/make_analysis.py figure2 --preset cpu                # -> results/figures/figure2_cpu.{png,csv}
python scripts/make_analysis.py figure3 --preset cpu --module encoder.layer.4.attention.self.value
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tsft.report.analysis import make_figure2, make_figure3, make_table4  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", choices=["table4", "figure2", "figure3"])
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "runs")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--out", type=Path, help="default: results/tables (table4) or results/figures")
    parser.add_argument("--method", default="dora", help="table4: the PEFT method of the source and its rows")
    parser.add_argument(
        "--module", default="layers.20.self_attn.v_proj", help="figure3: a gate's name (suffix) or index"
    )
    args = parser.parse_args(argv)
    out = args.out or ROOT / "results" / ("tables" if args.output == "table4" else "figures")
    try:
        if args.output == "table4":
            paths = make_table4(args.runs, args.preset, out, args.method)
        elif args.output == "figure2":
            paths = make_figure2(args.runs, args.preset, out)
        else:
            paths = make_figure3(args.runs, args.preset, out, args.module)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
