"""Fine-tune and evaluate one configuration (configs/train.yaml), writing result.json.

python train.py task=glue/rte model=minilm-l6 peft=lora sparsity=ts sparsity.lambda=1e-5
python train.py -m task=glue/rte peft=lora,dora seed=1,2,3
"""

import sys

import hydra
from omegaconf import DictConfig

from tsft.config import check_group_choices, check_override_keys, with_implied_groups
from tsft.errors import InputError


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    from tsft.lit.stopping import RunStopped  # torch & co. load after the override check has passed
    from tsft.pipeline import run
    from tsft.report.result import summary_line

    try:
        run_dir, result = run(cfg)
    except InputError as err:
        sys.exit(f"error: {err}")
    except RunStopped as stop:  # SIGTERM / Ctrl-C: say where to resume, exit 128 + the signal's number
        print(f"error: {stop}", file=sys.stderr)
        sys.exit(stop.exit_status)
    print(f"{summary_line(result)} -> {run_dir}/result.json")
    return result["score"]  # the objective for sweepers


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
        check_override_keys(sys.argv[1:])
        sys.argv[1:] = with_implied_groups(sys.argv[1:])  # before Hydra parses the command line
    except InputError as err:
        sys.exit(f"error: {err}")
    main()
