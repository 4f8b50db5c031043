"""`python evaluate.py [suite=...]`: benchmark suite (config: conf/evaluate.yaml, conf/suite/)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from evaluation.suite import evaluate_main

    sys.exit(evaluate_main(cfg))


if __name__ == "__main__":
    main()
