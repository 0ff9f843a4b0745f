"""The suite's own rules (tests/conftest.py): paper-scale tests are opt-in, and any other skip fails
a CI run."""

import ast
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TESTS = '''
import pytest

@pytest.mark.paper_scale
def test_opt_in():
  pass

def test_passes():
  pass
'''


def _pytest(tmp_path, body: str, *args):
  (tmp_path / 'test_inner.py').write_text(body)
  return subprocess.run([
      sys.executable, '-m', 'pytest', '-q', '-p', 'conftest', '-p', 'no:cacheprovider',
      str(tmp_path / 'test_inner.py'), *args
  ],
                        cwd=tmp_path,
                        capture_output=True,
                        text=True,
                        env=dict(os.environ, PYTHONPATH=os.path.join(REPO, 'tests')),
                        timeout=120,
                        check=False)


def test_the_paper_scale_opt_in_is_the_one_expected_skip(tmp_path):
  result = _pytest(tmp_path, _TESTS, '--fail-on-unexpected-skip')
  assert result.returncode == 0, result.stdout
  assert '1 passed, 1 skipped' in result.stdout and 'unexpected' not in result.stdout


def test_any_other_skip_is_listed_and_fails_the_run_with_the_ci_flag(tmp_path):
  body = _TESTS + '''
def test_environment():
  pytest.skip('no kernel here')
'''
  lenient = _pytest(tmp_path, body)
  assert lenient.returncode == 0, lenient.stdout
  assert ('1 unexpected skip(s):' in lenient.stdout and
          'test_environment: Skipped: no kernel here' in lenient.stdout)
  strict = _pytest(tmp_path, body, '--fail-on-unexpected-skip')
  assert strict.returncode == 1, strict.stdout
  assert '(--fail-on-unexpected-skip: the run fails)' in strict.stdout


def test_the_fault_injection_plan_is_printed_in_the_summary_also_under_xdist(tmp_path):
  body = '''
def test_faults(record_property):
  record_property('fault_injection_seed', 1234)
  record_property('fault_injection_kill_1', 'after step 400')
'''
  for args in ((), ('-n', '2')):
    result = _pytest(tmp_path, body, *args)
    assert result.returncode == 0, result.stdout
    assert ('fault injection (replay with FAULT_INJECTION_SEED=<seed>):'
            in result.stdout), result.stdout
    assert ('fault_injection_seed: 1234' in result.stdout and
            'fault_injection_kill_1: after step 400' in result.stdout)


def test_the_integration_tier_runs_only_when_asked(tmp_path):
  body = '''
import pytest

@pytest.mark.integration
def test_machinery():
  pass

def test_core():
  pass
'''
  core = _pytest(tmp_path, body, '--fail-on-unexpected-skip')
  assert core.returncode == 0 and '1 passed, 1 deselected' in core.stdout, core.stdout
  both = _pytest(tmp_path, body, '--integration', '--fail-on-unexpected-skip')
  assert (both.returncode == 0 and '2 passed' in both.stdout and
          'deselected' not in both.stdout), both.stdout


def test_no_tier_mark_hides_in_a_script():
  """A file of the second tier says so in a module-level `pytestmark`; the same line inside a string
  (a script a test runs) marks nothing and breaks that script."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  for name in sorted(os.listdir(tests_dir)):
    if name.endswith('.py'):
      with open(os.path.join(tests_dir, name), encoding='utf-8') as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
          assert not re.search(r'^pytestmark\s*=', node.value,
                               re.MULTILINE), f'{name}, line {node.lineno}'
