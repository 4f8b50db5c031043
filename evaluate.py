"""`python evaluate.py`: evaluation (config: conf/evaluate.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    sys.exit("deepstem: evaluation is not available yet (issue #7 is open); nothing was run.")


if __name__ == "__main__":
    main()
