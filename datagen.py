"""`python datagen.py`: training-data generation (config: conf/datagen.yaml; logic: datagen/cli.py)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="datagen")
def main(cfg: DictConfig) -> None:
    from datagen.cli import run
    from datagen.parameters import ConfigError

    try:
        run(cfg)
    except ConfigError as err:
        sys.stderr.write(f"datagen: error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
