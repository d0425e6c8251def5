"""The README is the user's manual: keep its commands and tables true to the code."""

import re
from pathlib import Path

from zimage_tornado.config import Settings
from zimage_tornado.web.routes import ENDPOINTS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_word_for_word():
    command = re.search(r'^TEST_COMMAND="(.+)"$', (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    assert command in README


def test_every_setting_is_in_the_settings_table():
    for name in Settings.__dataclass_fields__:
        assert re.search(r"^\| `%s` \|" % name, README, re.M), name


def test_every_endpoint_is_documented():
    for method, path, _ in ENDPOINTS:
        assert "`%s %s`" % (method, path) in README, path


def test_fault_matrix_table_is_the_tested_one():
    from test_fault_matrix import ENDPOINTS, MATRIX
    assert "| Upstream fault | %s |" % " | ".join(ENDPOINTS) in README
    for fault, cells in MATRIX.items():
        assert "| %s | %s |" % (fault, " | ".join(cells)) in README, fault
