"""A finished run's adapter (<run_dir>/adapter/): evaluate it again, or push it to the Hugging Face hub.

python scripts/adapter.py evaluate results/runs/glue/sst2/<run>     # prints the run's metrics, recomputed
python scripts/adapter.py push results/runs/glue/sst2/<run> <user>/<repo>
"""

from __future__ import annotations

import argparse
import json
import sys

from tsft.integrations.run_adapter import evaluate_run, push_to_hub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="rebuild the model from the run's adapter and evaluate it")
    evaluate.add_argument("run_dir")
    push = commands.add_parser("push", help="upload the run's adapter and model card to a hub model repo")
    push.add_argument("run_dir")
    push.add_argument("repo_id")
    push.add_argument("--public", action="store_true", help="a public repository (default: private)")
    args = parser.parse_args(argv)
    try:
        if args.command == "evaluate":
            print(json.dumps(evaluate_run(args.run_dir), indent=1))
        else:
            print(push_to_hub(args.run_dir, args.repo_id, private=not args.public))
    except (FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
