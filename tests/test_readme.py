"""The README is a front page whose links and figures hold: its contents line points at its own headings, every
relative link exists, and the demo table is what `python demo.py` prints."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


README = os.path.join(ROOT, "README.md")
MAX_LINES = 250


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def markdown_table(text: str, first_header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table in `text` whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|- "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_readme_is_a_front_page_with_a_contents_line_that_resolves():
    text = read(README)
    assert len(text.splitlines()) <= MAX_LINES
    headings = {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    contents = next(line for line in text.splitlines() if line.startswith("**Contents:**"))
    targets = re.findall(r"\]\(#([^)]+)\)", contents)
    assert targets and not set(targets) - headings, set(targets) - headings


@pytest.mark.parametrize("document", ["README.md"] + [os.path.join("docs", name) for name in
                                                      sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                      if name.endswith(".md")])
def test_every_relative_link_exists(document):
    path = os.path.join(ROOT, document)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(path)):
        if re.match(r"[a-z]+://", target):
            continue
        assert os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))), (document, target)


def test_the_readme_demo_table_is_what_the_demo_prints(tmp_path):
    # Given the README's demo table and the versions it says printed it
    text = read(README)
    expected = markdown_table(text, "task")
    stated = re.search(r"transformers ([\d.]+), torch ([\d.]+)", text[:text.index("| task |")])
    assert stated, "the README states the transformers and torch versions that printed its demo table"
    # When the demo runs as the README's set-up command runs it
    result = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--out", str(tmp_path / "demo")],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = markdown_table(result.stdout, "task")
    # Then it prints the README's rows, and with the stated versions the README's figures
    assert [row[:2] for row in printed] == [row[:2] for row in expected]
    import torch
    import transformers

    installed = (transformers.__version__, torch.__version__.split("+")[0])
    if installed != stated.groups():
        pytest.skip(f"the README's figures come from transformers {stated.group(1)}, torch {stated.group(2)}; this is "
                    f"transformers {installed[0]}, torch {installed[1]}: rerun python demo.py and update them")
    assert printed == expected
