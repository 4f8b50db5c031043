"""`python train.py model=airpi data=multislice`: train one of the four networks (conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from physics.runtime import report_error
    from training.cli import ConfigError, run
    from training.datasets import DataError

    try:
        return run(cfg)
    except (ConfigError, DataError) as err:  # one line `deepstem: error: ...`, exit status 2
        sys.exit(report_error(err))


if __name__ == "__main__":
    main()
