"""Every command the README and the docs show still works as written: each `lightscale fit|validate|test|predict`
line parses (config files, keys, values, class paths), each `make` target exists, each script and config file
named exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, run_cli

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md"]
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def shell_lines(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def as_parse_check(command: str) -> list[str] | None:
    """``lightscale SUB ARGS`` -> ARGS for a parse-only run (``--print_config``), with the placeholders of a page
    replaced by real files; ``None`` for other commands."""
    words = shlex.split(command.replace("<run>", "RUN"))
    if words[:1] != ["lightscale"] or len(words) < 2 or words[1] not in SUBCOMMANDS:
        return None
    args = []
    for word in words[1:]:
        # a saved run config stands for its experiment's config (the same keys)
        match = re.fullmatch(r"runs/([\w-]+)/RUN/config\.yaml", word)
        args.append(str(REPO / "configs" / "experiment" / f"{match.group(1)}.yaml") if match else word)
    return [*args, "--print_config"]


COMMANDS = [(page, line) for page in PAGES for line in shell_lines(page)]
LIGHTSCALE = [(p, line) for p, line in COMMANDS if as_parse_check(line) is not None]


def test_the_pages_show_commands() -> None:
    assert len(LIGHTSCALE) >= 10 and any(line.startswith("make ") for _, line in COMMANDS)


@pytest.mark.parametrize(("page", "command"), LIGHTSCALE, ids=[f"{p.name}: {c[:60]}" for p, c in LIGHTSCALE])
def test_every_lightscale_command_parses(
    page: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # pages give paths relative to the repository root
    code = run_cli(*as_parse_check(command))
    assert code == 0, f"{page.name}: {command}\n{capsys.readouterr().err[-2000:]}"


def test_every_make_target_and_file_named_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for page, line in COMMANDS:
        words = shlex.split(line.replace("<", "").replace(">", ""))
        if words[0] == "make" and len(words) > 1:
            assert words[1] in targets, f"{page.name}: make {words[1]}"
        for word in words:
            if re.fullmatch(r"(configs|slurm|benchmarks|tests|src|docs)/[\w./-]+\.(yaml|sh|sbatch|py|md)", word):
                assert (REPO / word).is_file(), f"{page.name}: {word}"


def test_every_relative_link_resolves() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(((?!https?://)[^)#]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
