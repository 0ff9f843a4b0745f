"""The docs stay true: math.md names code and tests that exist; README.md is a front page whose
links and commands resolve; docs/results.md opens with its provenance table."""

import ast
import importlib
import os
import re

import pytest

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, 'docs', 'math.md'), encoding='utf-8') as _f:
  MATH = _f.read()
# a config field; 'tests/test_file.py::test_name' below is the naming example
NOT_CODE = {'eval.clip_x'}
CODE_NAMES = sorted(set(re.findall(
    r'`((?:diffusion|distill|models|samplers|eval|modes|train|data)(?:\.\w+)+)`', MATH))
                    - NOT_CODE)
TEST_NAMES = sorted(
    set(re.findall(r'`(tests/\w+\.py)::(\w+)`', MATH)) - {('tests/test_file.py', 'test_name')})


def test_math_md_names_code_and_tests():
  assert len(CODE_NAMES) > 40 and len(TEST_NAMES) > 60  # the patterns still find the tables


@pytest.mark.parametrize('name', CODE_NAMES)
def test_every_function_math_md_names_exists(name):
  module_name, _, attribute = name.rpartition('.')
  while module_name:  # the longest importable prefix, then attributes (a class's method included)
    try:
      obj = importlib.import_module(module_name)
      break
    except ModuleNotFoundError:
      module_name, _, parent = module_name.rpartition('.')
      attribute = f'{parent}.{attribute}'
  for part in attribute.split('.'):
    obj = getattr(obj, part)  # AttributeError names what docs/math.md got wrong


@pytest.mark.parametrize('path,test', TEST_NAMES)
def test_every_test_math_md_names_exists(path, test):
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    names = {
        node.name for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.FunctionDef)
    }
  assert test in names, f'docs/math.md names {path}::{test}, which does not exist'


# README.md stays a front page; every page's links resolve; README's commands name real things.
PAGES = ['README.md', 'benchmarks/README.md'] + sorted(
    os.path.join('docs', name)
    for name in os.listdir(os.path.join(REPO, 'docs'))
    if name.endswith('.md'))


def _read(path):
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    return f.read()


def _without_code_blocks(text):
  return re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)


def _anchors(path):
  """GitHub's heading anchors of a file: lowercase, punctuation dropped, spaces to '-'."""
  anchors, seen = set(), {}
  for heading in re.findall(r'^#{1,6} (.*)$', _without_code_blocks(_read(path)), flags=re.M):
    slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f'{slug}-{count}')
  return anchors


def test_readme_is_a_front_page_of_at_most_250_lines():
  assert len(_read('README.md').splitlines()) <= 250


def test_readme_names_no_commit():
  tokens = re.findall(r'\b[0-9a-f]{7,40}\b', _read('README.md'))
  hashes = [token for token in tokens if re.search('[a-f]', token)]
  assert not hashes, f'README.md names commits {hashes}: they belong in docs/results.md'


def test_results_md_opens_with_its_provenance_table():
  lines = _read('docs/results.md').splitlines()
  first_table_row = next(line for line in lines if line.startswith('|'))
  assert first_table_row == '| section | commit | machine | date |'


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
  broken = []
  for target in re.findall(r'\]\(([^)\s]+)\)', _without_code_blocks(_read(page))):
    if re.match(r'[a-z]+:', target):
      continue  # https:, mailto:
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(os.path.join(REPO, resolved)):
      broken.append(f'{target} (no file {resolved})')
    elif anchor and resolved.endswith('.md') and anchor not in _anchors(resolved):
      broken.append(f'{target} (no heading #{anchor} in {resolved})')
  assert not broken, f'{page} links to {broken}'


def _readme_main_commands():
  """Every `python main.py ...` command of README.md's code blocks, continuation lines joined."""
  blocks = re.findall(r'^```bash\n(.*?)^```', _read('README.md'), flags=re.S | re.M)
  lines = '\n'.join(blocks).replace('\\\n', ' ').splitlines()
  return [re.sub(r'\s+#.*$', '', line) for line in lines if 'python main.py' in line]


def test_readme_commands_name_existing_configs_modes_flags_and_fields():
  import main  # pylint: disable=g-import-not-at-top  (flags only; no JAX at import)
  flag_names = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", _read('main.py')))
  commands = _readme_main_commands()
  assert len(commands) >= 10
  for command in commands:
    command = command.replace('$C', 'configs/digits_teacher.py')
    config_path = re.search(r'--config=(\S+)', command).group(1)
    assert os.path.exists(os.path.join(REPO, config_path)), command
    config = importlib.import_module(config_path[:-len('.py')].replace('/', '.')).get_config()
    mode = re.search(r'--mode=(\w+)', command)
    assert mode is None or mode.group(1) in main.MODE_NAMES, command
    for flag in re.findall(r'(?:^|\s)--(\w+)', command):
      assert flag in flag_names, f'{command}: no flag --{flag}'
    for field in re.findall(r'--config\.([\w.]+)=', command):
      node = config
      for part in field.split('.'):
        assert part in node, f'{command}: no field {field} in {config_path}'
        node = node[part]
