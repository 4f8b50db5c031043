"""`python train.py`: training (config: conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    sys.exit("deepstem: training is not available yet (issue #6 is open); nothing was run.")


if __name__ == "__main__":
    main()
