"""The README is the front door and docs/ the manual: keep their commands, tables and links true
to the code."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from zimage_tornado.config import GROUPS, SETTING_DEFAULTS, reference
from zimage_tornado.web.routes import ENDPOINTS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if line.startswith("#")}


def test_the_readme_is_short_and_has_the_two_commands():
    assert len(README.splitlines()) <= 250
    command = re.search(r'^TEST_COMMAND="(.+)"$', (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    assert command in README  # CI runs the README's test command word for word
    assert "pip install -r requirements.txt . && .venv/bin/zimage-tornado --demo" in README
    assert "spec" not in README.lower()  # no reference to a document the reader does not have


@pytest.mark.parametrize("name", ["README.md", *sorted("docs/" + name for name in DOCS)])
def test_every_relative_link_resolves(name):
    source = ROOT / name
    for target in LINK_RE.findall(source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        path, _, anchor = target.partition("#")
        resolved = (source.parent / unquote(path)).resolve() if path else source
        assert resolved.exists(), "%s links to %s, which does not exist" % (name, target)
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved.read_text()), "%s links to a missing heading: %s" % (name, target)


def test_the_settings_reference_is_generated_from_the_code():
    assert DOCS["configuration.md"] == reference(), "run: python -m zimage_tornado.config > docs/configuration.md"
    grouped = [name for _, names in GROUPS for name in names]
    assert sorted(grouped) == sorted(SETTING_DEFAULTS)  # every setting in exactly one group


def test_every_endpoint_is_documented():
    for method, path, _ in ENDPOINTS:
        assert "`%s %s`" % (method, path) in DOCS["api.md"], path


def test_fault_matrix_table_is_the_tested_one():
    from test_fault_matrix import ENDPOINTS as COLUMNS
    from test_fault_matrix import MATRIX
    assert "| Upstream fault | %s |" % " | ".join(COLUMNS) in DOCS["testing.md"]
    for fault, cells in MATRIX.items():
        assert "| %s | %s |" % (fault, " | ".join(cells)) in DOCS["testing.md"], fault
