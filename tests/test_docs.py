"""docs/math.md names the function implementing each equation and the tests checking it: every name must exist."""

import ast
import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, 'docs', 'math.md'), encoding='utf-8') as _f:
  MATH = _f.read()
NOT_CODE = {'eval.clip_x'}  # a config field; 'tests/test_file.py::test_name' below is the naming example
CODE_NAMES = sorted(set(re.findall(r'`((?:diffusion|distill|models|samplers|eval|modes|train|data)(?:\.\w+)+)`', MATH))
                    - NOT_CODE)
TEST_NAMES = sorted(set(re.findall(r'`(tests/\w+\.py)::(\w+)`', MATH)) - {('tests/test_file.py', 'test_name')})


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
    names = {node.name for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.FunctionDef)}
  assert test in names, f'docs/math.md names {path}::{test}, which does not exist'
