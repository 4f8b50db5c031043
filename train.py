"""`python train.py model=airpi data=multislice`: train one of the four networks (conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from training.cli import ConfigError, run

    try:
        return run(cfg)
    except ConfigError as err:
        sys.exit(str(err))


if __name__ == "__main__":
    main()
