"""`python datagen.py`: training-data generation (config: conf/datagen.yaml; logic: datagen/cli.py)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="datagen")
def main(cfg: DictConfig) -> None:
    from datagen.cli import command

    code = command(cfg)  # every deepstem error is one `deepstem: error:` line and exit status 2
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
