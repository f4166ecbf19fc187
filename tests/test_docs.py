"""The documentation stays true to the code: docs/options.md lists the options `--help-all` lists, and no link is broken."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re

import pytest
import yaml
from conftest import REPO
from transformers import TrainingArguments

OPTIONS_DOC = REPO / "docs" / "options.md"
REGENERATE = "Regenerate it with: python tools/options_doc.py"
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@functools.cache
def help_all_options() -> tuple[str, ...]:
    """The options `hf-transfer train --help-all` prints, a bool's `--no_<name>` counted as `<name>`."""
    from hf_transfer.cli import main

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        main(["train", "--help-all"])
    names = re.findall(r"^  --(\w+)", shown.getvalue(), flags=re.MULTILINE)
    return tuple(name for name in names if not (name.startswith("no_") and name[3:] in names))


def documented_sections() -> dict[str, dict[str, str]]:
    """docs/options.md as {section heading: {option: its table row}}, options in the order listed."""
    sections, heading = {}, ""
    for line in OPTIONS_DOC.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:]
            sections[heading] = {}
        elif row := re.match(r"\| `(\w+)` \|", line):
            sections.setdefault(heading, {})[row.group(1)] = line
    return sections


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]


def default_shown(cell: str):
    return yaml.safe_load(cell.strip("`"))


def test_options_doc_lists_exactly_the_options_of_help_all():
    from hf_transfer.options import TRAINING_DEFAULTS, HfTransferTrainingArguments

    shown = set(help_all_options())
    trainer = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    extended = {f.name for f in dataclasses.fields(HfTransferTrainingArguments)
                if f.name in trainer and (f.metadata, f.default) != (trainer[f.name].metadata, trainer[f.name].default)}
    assert set(TRAINING_DEFAULTS) | extended <= shown, "a changed TrainingArguments default is not an option of --help-all"
    expected = {name for name in shown if name not in trainer} | set(TRAINING_DEFAULTS) | extended
    documented = {name for rows in documented_sections().values() for name in rows}
    assert documented == expected, (f"docs/options.md is out of date: missing {sorted(expected - documented)}, "
                                    f"not options of --help-all (or not changed by hf_transfer) {sorted(documented - expected)}. {REGENERATE}")


def test_each_section_of_the_options_doc_lists_its_dataclass_with_its_defaults():
    from hf_transfer.options import ARGUMENT_CLASSES, TRAINING_DEFAULTS

    sections = documented_sections()
    for cls in ARGUMENT_CLASSES:
        if issubclass(cls, TrainingArguments):
            continue
        heading = next((heading for heading in sections if f"`{cls.__name__}`" in heading), None)
        assert heading, f"docs/options.md has no section for {cls.__name__}. {REGENERATE}"
        fields = [f for f in dataclasses.fields(cls) if f.init]
        assert list(sections[heading]) == [f.name for f in fields], f"the {cls.__name__} section is out of date. {REGENERATE}"
        for f in fields:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert default_shown(cells(sections[heading][f.name])[2]) == default, f"`{f.name}`'s default changed. {REGENERATE}"
    changed = next(rows for heading, rows in sections.items() if "`TRAINING_DEFAULTS`" in heading)
    assert list(changed) == list(TRAINING_DEFAULTS), f"the TRAINING_DEFAULTS section is out of date. {REGENERATE}"
    for name, value in TRAINING_DEFAULTS.items():
        assert default_shown(cells(changed[name])[2]) == value, f"hf_transfer's default of `{name}` changed. {REGENERATE}"


# ---- links


def outside_code(text: str) -> str:
    """`text` without fenced code blocks and inline code, where a bracket is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"``.+?``|`[^`\n]+`", "", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown page: lower case, punctuation dropped, spaces to hyphens,
    a repeated one suffixed -1, -2..."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL), flags=re.MULTILINE):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page) -> list[str]:
    """The relative links and images of a markdown page whose file or #anchor does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", outside_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings_that_exist(page):
    assert not broken_links(page), f"{page.relative_to(REPO)} has broken links: {broken_links(page)}"


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "guide.md").write_text("# A guide\n\n## What trains: `freeze` strategies\n\n## Dirty data\n## Dirty data\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](guide.md#what-trains-freeze-strategies) [ok](guide.md#dirty-data-1) ![ok](guide.md) [web](https://x.org/y)\n"
                    "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
                    "[gone](missing.md) [bad anchor](guide.md#nothing-here) [own](#no-such-heading)\n")
    assert broken_links(page) == ["missing.md (no such file)", "guide.md#nothing-here (no heading #nothing-here in guide.md)",
                                  "#no-such-heading (no heading #no-such-heading in page.md)"]


def test_the_front_page_links_every_guide():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", outside_code((REPO / "README.md").read_text())))
    guides = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert guides <= linked, f"README.md does not link {sorted(guides - linked)}"


def test_the_front_page_starts_with_the_commands_ci_runs():
    first_block = re.search(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.MULTILINE | re.DOTALL).group(1)
    ci = (REPO / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "python -m pytest"):
        assert command in first_block and command in ci, f"README's first commands and .ci/run disagree on {command!r}"
