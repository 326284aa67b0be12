"""The README documents every config field, and its first two commands are the ones CI relies on."""
import dataclasses
import os
import re

from helpers import ROOT

from config import SECTIONS


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_every_config_field_is_in_the_reference():
    text = readme()
    reference = text[text.index("## Configuration reference"):text.index("## Troubleshooting")]
    missing = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if f"`{f.name}`" not in reference]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_readme_test_command_is_what_ci_runs():
    head = readme().split("\n## ")[0]
    install = "python3 -m pip install -r requirements-dev.txt && "
    command = next(line for line in head.splitlines() if line.startswith(install))[len(install):]
    # CI lists the slow ones
    assert command.startswith("python3 -m pytest -q") and "--durations=" in command and "&&" not in command
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = f.read().splitlines()
    assert lines[-1] == command  # exactly the README's command, after the installs and ruff
    assert "python3 -m ruff check ." in lines


def test_every_picture_the_readme_shows_exists():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme())
    assert pictures and all(os.path.isfile(os.path.join(ROOT, p)) for p in pictures), pictures
