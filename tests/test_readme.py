"""README.md stays true: the two set-up commands come first, its --help commands run, and its
configuration table is the one generated from TrainConfig."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines():
    """Command lines of the README's bash blocks, without comments."""
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command:
                yield command


def test_the_two_setup_commands_come_first():
    commands = list(shell_lines())
    assert commands[:2] == ["pip install -r requirements.txt && python train.py",
                            "pip install -r requirements.txt && python -m pytest"]


HELP_COMMANDS = [c for c in shell_lines() if re.fullmatch(r"python [\w/]+\.py( \w+)? --help", c)]


def test_readme_shows_help_commands():
    assert {"python train.py --help", "python predict.py --help", "python dataset.py --help"} <= set(HELP_COMMANDS)


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_readme_help_commands_run(command):
    args = shlex.split(command)
    result = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_configuration_table_matches_the_dataclass():
    import train

    table = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", README, flags=re.S)
    assert table, "README.md lost its configuration table markers"
    assert table.group(1).strip() == train.config_table(), \
        "README.md's configuration table is stale: paste python -c \"import train; print(train.config_table())\""


def test_every_train_flag_in_the_readme_exists():
    import train

    flags = {"--" + f.replace("_", "-") for f in train.TrainConfig.__dataclass_fields__} | {"--help"}
    flags |= {"--no-" + f.replace("_", "-") for f in train.TrainConfig.__dataclass_fields__}
    for command in shell_lines():
        if "train.py" in command:
            used = set(re.findall(r"(--[a-z][a-z-]*)", command.split("train.py", 1)[1]))
            assert used <= flags, f"{command}: unknown {used - flags}"


def test_reliability_table_names_existing_tests():
    named = set(re.findall(r"`(test_\w+)`", README))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    assert named, "README.md names no tests"
    assert named <= defined, f"README.md names tests that do not exist: {sorted(named - defined)}"


def test_recipe_study_table_is_the_committed_results():
    import study

    table = re.search(r"<!-- recipes-table:start -->\n(.*?)\n<!-- recipes-table:end -->", README, flags=re.S)
    assert table, "README.md lost its recipe-table markers"
    rows = study.read_rows(ROOT / "results" / "recipes.csv")
    assert rows, "results/recipes.csv is missing"
    assert table.group(1).strip() == study.markdown_table(rows), \
        "README.md's recipe table is stale: paste results/recipes.md (python study.py --report)"

