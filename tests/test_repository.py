"""The repository keeps its promises: CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_commands = [c for c in commands if c.endswith("pytest")]
    assert len(test_commands) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


def test_readme_has_exactly_two_setup_commands_both_installing_torch_first():
    setup = [c for c in _readme_commands() if c.startswith("pip install torch==")]
    assert len(setup) == 2
    run_command = next(c for c in setup if not c.endswith("pytest"))
    words = run_command.split("&&")[-1].split()
    script = words[words.index("python") + 1]
    assert (ROOT / script).is_file(), f"README run command names a missing file: {script}"
    for override in words[words.index("python") + 2 :]:  # e.g. experiment=quickstart names a config
        group, _, name = override.partition("=")
        assert (ROOT / "conf" / group / f"{name}.yaml").is_file(), f"README: no config for {override}"
