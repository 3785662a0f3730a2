"""Aggregate a grid's result.json files into a paper table (Markdown + LaTeX), the paper's numbers beside ours.

python scripts/make_table.py table3 --preset cpu          # -> results/tables/table3_cpu.{md,tex}
python scripts/make_table.py table1 --runs results/runs   # -> results/tables/table1.{md,tex}
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tsft.report.tables import make_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["table1", "table2", "table3", "table5"])
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "results" / "runs", help="directory searched for result.json"
    )
    parser.add_argument(
        "--preset", default="paper", help="only runs whose result.json has this preset (cpu, paper, ...)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "tables")
    args = parser.parse_args(argv)
    if args.table == "table2":  # visual instruction tuning: its own columns (tsft/report/table2.py)
        from tsft.report.table2 import make_table2

        paths = make_table2(args.runs, args.preset, args.out)
    else:
        paths = make_table(args.table, args.runs, args.preset, args.out)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
