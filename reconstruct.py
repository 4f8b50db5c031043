"""`python reconstruct.py input=SCAN method=...`: reconstruction (config: conf/reconstruct.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="reconstruct")
def main(cfg: DictConfig) -> None:
    from evaluation.cli import reconstruct_main

    sys.exit(reconstruct_main(cfg))


if __name__ == "__main__":
    main()
