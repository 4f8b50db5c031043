"""`python datagen.py`: training-data generation (config: conf/datagen.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="datagen")
def main(cfg: DictConfig) -> None:
    sys.exit("deepstem: training-data generation is not available yet (issue #3 is open); nothing was run.")


if __name__ == "__main__":
    main()
