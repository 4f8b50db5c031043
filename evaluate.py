"""`python evaluate.py [suite=...]`: benchmark suite (config: conf/evaluate.yaml, conf/suite/)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from evaluation.cli import missing_key_message, setup_threads
    from evaluation.suite import evaluate_main
    from physics.runtime import report_error

    message = missing_key_message(cfg)  # e.g. suite=tiny without suite.scans.tiny.path
    if message is not None:
        sys.exit(report_error(message))
    try:
        setup_threads(cfg)
    except ValueError as err:
        sys.exit(report_error(err))
    sys.exit(evaluate_main(cfg))


if __name__ == "__main__":
    main()
