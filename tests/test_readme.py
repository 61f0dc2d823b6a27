"""Every Python example in README.md and docs/*.md runs (the docs must stay true).

A docs block that cannot run alone (a signature, or a step of a loop that needs a model) is
preceded by an HTML comment starting ``<!-- fragment``; every other block runs here, with
``print`` silenced."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"(?:^[ \t]*(<!-- fragment[^\n]*-->)[ \t]*\n)?^[ \t]*```python\n(.*?)^[ \t]*```", flags=re.S | re.M)


def _examples(path: Path) -> list:
    blocks = [(comment, code) for comment, code in FENCE.findall(path.read_text())]
    return [pytest.param(path, code, id=f"{path.relative_to(ROOT)}:{i}") for i, (comment, code) in enumerate(blocks) if not comment]


EXAMPLES = [p for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] for p in _examples(path)]


@pytest.mark.no_poison
@pytest.mark.parametrize("path,code", EXAMPLES)
def test_example_runs(path, code):
    exec(compile(code, str(path), "exec"), {"print": lambda *a, **k: None})


def test_every_doc_has_a_runnable_example():
    """The fragment marker cannot silently switch off a whole file's examples."""
    covered = {str(e.values[0].relative_to(ROOT)) for e in EXAMPLES}
    assert covered == {"README.md"} | {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
