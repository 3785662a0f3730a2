"""Fine-tune and evaluate one configuration (configs/train.yaml), writing result.json.

python train.py task=glue/rte model=minilm-l6 peft=lora sparsity=ts sparsity.lambda=1e-5
python train.py -m task=glue/rte peft=lora,dora seed=1,2,3
"""

import sys

import hydra
from omegaconf import DictConfig

from tsft.config import check_group_choices
from tsft.errors import InputError


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    from tsft.pipeline import run  # torch & co. load after the override check has passed

    try:
        run_dir, result = run(cfg)
    except InputError as err:
        sys.exit(f"error: {err}")
    metrics = ", ".join(f"{k}={v:.4f}" if v is not None else f"{k}=null" for k, v in result["metrics"].items())
    print(f"{result['task']} {result['method']} ({result['model']}): {metrics} -> {run_dir}/result.json")
    return result["score"]  # the objective for sweepers


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
    except InputError as err:
        sys.exit(f"error: {err}")
    main()
