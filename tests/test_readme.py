"""README.md and docs/*.md stay true: the two set-up commands come first, every command in a bash block
runs (--help) or parses, every link and image points at something in the repository (headings too),
and every table that code generates is the one it generates now."""

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shell_lines(text: str):
    """Command lines of the bash blocks, continuation lines joined, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.split(r"(?:^|\s)#", line)[0].strip()  # as the shell: # after a blank starts a comment
            if command and not command.startswith("#"):
                yield command


def simple_commands(line: str):
    """The simple commands of a shell line (split at ; && || | and do/then), as word lists without
    leading VAR=value assignments, sudo or time, and without redirections."""
    for part in re.split(r";|&&|\|\||\|", line):
        words = shlex.split(part.replace("$i", "0"))  # the loop variable of the cross-validation loops
        while words and (re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]) or words[0] in ("do", "then", "sudo", "time")):
            words = words[1:]
        if words[:2] == ["/usr/bin/time", "-v"]:
            words = words[2:]
        for i, word in enumerate(words):
            if word.startswith((">", "2>", "<")):
                words = words[:i]
                break
        if words:
            yield words


COMMANDS = [(page, line) for page in PAGES for line in shell_lines(page.read_text())]

# Programs whose lines are shown as shell, not checked here (their effect is described beside them).
UNCHECKED = {"mkdir", "git", "cp", "wandb", "for", "done", "cd", "ls", "nvidia-smi", "scontrol", "squeue", "scancel",
             "python3", "module", "source", "export", "conda", "tail", "scp", "df", "quota", "ln", "rm", "curl", "sinfo"}
# The SLURM scripts hand the flags after the script name to these scripts.
SLURM_SCRIPT_TARGETS = {"slurm/train.sh": "train", "slurm/train_multigpu.sh": "train", "slurm/predict.sh": "predict",
                        "slurm/gpu_check.sh": "gpu_check", "slurm/download.sh": "download"}


class _Parsed(Exception):
    """Raised instead of running a script once its command line has parsed."""


def parse_only(module_name: str, args: list[str], monkeypatch, capsys) -> None:
    """Parse a script's command line with the script's own parser, without running the script."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        self.allow_abbrev = False  # a page shows flags in full: --epoch would pass for --epochs
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = importlib.import_module(module_name)
    try:
        module.main(args)
    except _Parsed:
        return
    except SystemExit as stop:
        pytest.fail(f"{module_name}.py {' '.join(args)}: exit {stop.code}: {capsys.readouterr().err.strip()}")
    pytest.fail(f"{module_name}.py {' '.join(args)} did not reach its argument parser")


def script_and_args(words: list[str]) -> tuple[str | None, list[str]]:
    """(path of the script a command line runs, the arguments it passes to it); skips the options of
    a launcher (torchrun, sbatch), which must be written --name=value."""
    for i, word in enumerate(words[1:], start=1):
        if not word.startswith("-"):
            return word, words[i + 1:]
    return None, []


def test_the_two_setup_commands_come_first():
    commands = list(shell_lines(README.read_text()))
    assert commands[:2] == ["pip install -r requirements.txt && python train.py",
                            "pip install -r requirements.txt && python -m pytest"]


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{rel(p)}: {c[:60]}" for p, c in COMMANDS])
def test_every_command_parses(page, line, monkeypatch, capsys):
    """Scripts exist and accept the flags shown; launchers' scripts exist; files named by -r exist."""
    for words in simple_commands(line):
        program = words[0]
        if program in UNCHECKED:
            continue
        if program == "pip":
            for i, word in enumerate(words[:-1]):
                if word == "-r":
                    assert (ROOT / words[i + 1]).is_file(), f"{line}: no {words[i + 1]}"
            continue
        if program == "bash":
            if words[1].startswith(("slurm/", ".ci/")):  # the repository's own scripts (others: an installer)
                assert (ROOT / words[1]).is_file(), f"{line}: no {words[1]}"
            continue
        if program == "python" and words[1:3] == ["-m", "pytest"]:
            markers = re.findall(r'^\s*"(\w+):', (ROOT / "pyproject.toml").read_text(), flags=re.M)
            for i, word in enumerate(words[:-1]):
                if word == "-m" and i > 1:
                    assert words[i + 1] in markers, f"{line}: pytest marker {words[i + 1]} is not registered"
            continue
        assert program in ("python", "torchrun", "sbatch"), f"{line}: add {program!r} to UNCHECKED or check it"
        script, args = script_and_args(words)
        assert script and (ROOT / script).is_file(), f"{line}: no script {script}"
        if "--help" in args:
            continue  # test_help_commands_run runs these
        module = SLURM_SCRIPT_TARGETS.get(script) if program == "sbatch" else script.removesuffix(".py")
        assert module, f"{line}: {script}'s flags are not checked; add it to SLURM_SCRIPT_TARGETS"
        parse_only(module, args, monkeypatch, capsys)


HELP_COMMANDS = sorted({c for _, c in COMMANDS if re.fullmatch(r"python [\w/]+\.py( \w+)? --help", c)})


def test_the_pages_show_help_commands():
    assert {"python train.py --help", "python predict.py --help", "python dataset.py --help"} <= set(HELP_COMMANDS)


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_commands_run(command):
    args = shlex.split(command)
    result = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


# ----------------------------------------------------------------------------- links and images


def slugs(text: str) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to -."""
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", strip_code(text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def strip_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


LINKS = [(page, target) for page in PAGES
         for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", strip_code(page.read_text()))
         if not re.match(r"[a-z]+:", target)]


def test_the_pages_link_to_each_other():
    assert {t for p, t in LINKS if p == README and t.startswith("docs/")}, "README.md links to no docs page"
    for page in PAGES[1:]:
        assert any((p.parent / t.split("#")[0]).resolve() == page for p, t in LINKS if p != page), \
            f"nothing links to {rel(page)}"


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{rel(p)}: {t}" for p, t in LINKS])
def test_relative_links_and_images_exist(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.is_relative_to(ROOT), f"{rel(page)}: {target} points outside the repository"
    assert file.exists(), f"{rel(page)}: {target} does not exist"
    if anchor:
        assert file.suffix == ".md", f"{rel(page)}: {target}: an anchor into a file that is not Markdown"
        assert anchor in slugs(file.read_text()), f"{rel(page)}: {rel(file)} has no heading #{anchor}"


# ----------------------------------------------------------------------------- generated tables


def marked(page: Path, name: str) -> str:
    found = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", page.read_text(), flags=re.S)
    assert found, f"{rel(page)} lost its {name} markers"
    return found.group(1).strip()


def recipe_rows() -> list[dict]:
    import study

    rows = study.read_rows(ROOT / "results" / "recipes.csv")
    assert rows, "results/recipes.csv is missing"
    return rows


# the front page's results: (budget, run) rows of results/recipes.csv
FRONT_PAGE_RUNS = [("short", "default"), ("short", "size-96"), ("short", "dynunet"), ("long", "default"),
                   ("long", "size-96"), ("long30", "default"), ("long30", "size-96")]


def results_table(rows: list[dict]) -> str:
    """README's results table: predict.py's default (flip TTA) test scores of FRONT_PAGE_RUNS."""
    by_run = {(r["budget"], r["name"]): r for r in rows}
    lines = ["| epochs | model | image size | test Dice | test thr. Jaccard | training minutes |",
             "|---:|---|---:|---:|---:|---:|"]
    for key in FRONT_PAGE_RUNS:
        r = by_run[key]
        flags = shlex.split(r["flags"])
        flag = lambda name: flags[flags.index(name) + 1]  # noqa: E731
        model = "MONAI DynUNet" if "dynunet" in flags else "Improved UNet"
        shared = " *" if float(r["other_cpu"]) > 0.05 else ""
        lines.append(f"| {flag('--epochs')} | {model} | {flag('--image-size')} | {float(r['test_dice_tta']):.3f} | "
                     f"{float(r['test_threshold_jaccard_tta']):.3f} | {float(r['train_minutes']):.1f}{shared} |")
    return "\n".join(lines)


def budget_study():
    import study

    return study


def budget_rows() -> list[dict]:
    rows = budget_study().read_rows(ROOT / "results" / "budgets.csv")
    assert rows, "results/budgets.csv is missing"
    return rows


def crossval_table() -> str:
    import crossval

    return crossval.markdown(json.loads((ROOT / "results" / "crossval-screen.json").read_text())).strip()


def config_table() -> str:
    import train

    return train.config_table()


def recipes_table() -> str:
    import study

    return study.markdown_table(recipe_rows())


GENERATED = {  # marker name -> (page, the code that generates the table, how to refresh it)
    "results-table": ("README.md", lambda: results_table(recipe_rows()),
                      "print tests.test_readme.results_table(...) or edit FRONT_PAGE_RUNS"),
    "config-table": ("docs/training.md", config_table, "python -c \"import train; print(train.config_table())\""),
    "recipes-table": ("docs/recipes.md", recipes_table, "python study.py --report, then paste results/recipes.md's table"),
    "crossval-table": ("docs/recipes.md", crossval_table, "paste results/crossval-screen.md"),
    "budget-table": ("README.md", lambda: budget_study().budget_table(budget_rows()),
                     "python -c \"import study; print(study.budget_table(study.read_rows('results/budgets.csv')))\""),
    "failures-table": ("docs/recipes.md", lambda: budget_study().failure_table(
        budget_study().read_rows(ROOT / "results" / "failures" / "min10.csv")
        + budget_study().read_rows(ROOT / "results" / "failures" / "min5.csv")),
        "python -c \"import study; print(study.failure_table(study.read_rows('results/failures/min10.csv') "
        "+ study.read_rows('results/failures/min5.csv')))\""),
    "budgets-table": ("docs/recipes.md", lambda: budget_study().markdown_table(budget_rows()),
                      "python study.py --report --results results/budgets.csv --figure images/budgets_time_to_dice.png"),
}


@pytest.mark.parametrize("name", GENERATED)
def test_generated_tables_are_what_their_code_generates(name):
    page, generate, refresh = GENERATED[name]
    expected = generate()
    assert marked(ROOT / page, name) == expected, f"{page}'s {name} is stale ({refresh}):\n{expected}"


def test_every_marked_table_is_checked():
    for page in PAGES:
        for name in re.findall(r"<!-- ([\w-]+):start -->", page.read_text()):
            assert GENERATED.get(name, ("",))[0] == rel(page), f"{rel(page)}: {name} is not in GENERATED"


# ----------------------------------------------------------------------------- named tests, size


def test_named_tests_exist():
    named = {name for page in PAGES for name in re.findall(r"`(test_\w+)`", page.read_text())}
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    assert named, "the pages name no tests"
    assert named <= defined, f"the pages name tests that do not exist: {sorted(named - defined)}"


def test_readme_stays_a_front_page():
    size = len(README.read_bytes())
    assert size < 14_000, f"README.md is {size} bytes: move detail to a page under docs/"
