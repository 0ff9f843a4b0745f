"""docs/reliability.md says what tests prove: every test it names exists in the file of its
section."""

import ast
import os
import re

import pytest

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sections():
  """{test file: test names} of docs/reliability.md: names in backquotes under a heading naming
  `tests/FILE.py`."""
  with open(os.path.join(REPO, 'docs', 'reliability.md'), encoding='utf-8') as f:
    text = f.read()
  sections = {}
  for heading, body in re.findall(
      r'^## .*?\(`(tests/\w+\.py)`\)\n(.*?)(?=^## |\Z)', text, re.M | re.S):
    sections[heading] = set(re.findall(r'`(test_\w+)`', body))
  return sections


def test_every_test_reliability_md_names_exists():
  sections = _sections()
  # the pattern still finds them
  assert len(sections) == 6 and sum(map(len, sections.values())) >= 30
  for path, names in sections.items():
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      defined = {
          node.name for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.FunctionDef)
      }
    assert names <= defined, f'docs/reliability.md names {sorted(names - defined)} in {path}'
