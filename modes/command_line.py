"""What a command that cannot start is told (no usable --config, an unknown --mode), and library
noise filters.

main.py calls these before and around flag parsing, so every such command ends in one `error:` line.
"""

import difflib
import importlib.util
import logging as pylogging
import os
import re
from typing import Optional, Sequence

import ml_collections

CONFIG_EXAMPLE = '--config=configs/digits_teacher.py'
# Words a newcomer types for --mode that no spelling distance maps to the mode they mean.
MODE_INTENTS = {'train': ('pipeline', 'teacher'), 'all': ('pipeline',), 'run': ('pipeline',),
                'eval': ('fid',), 'evaluate': ('fid',), 'generate': ('sample',),
                'distillation': ('distill',), 'encode': ('encoder',),
                # the modes that score samples train the digits classifier when it is missing
                'classifier': ('fid',)}


def flag_values(argv: Sequence[str], name: str) -> list[str]:
  """The values given to --name (or -name) in argv, as `--name=v` or `--name v`, in order."""
  values = []
  for i, arg in enumerate(argv[1:], start=1):
    for prefix in (f'--{name}', f'-{name}'):
      if arg.startswith(prefix + '='):
        values.append(arg[len(prefix) + 1:])
      elif arg == prefix and i + 1 < len(argv):
        values.append(argv[i + 1])
  return values


def mode_error(argv: Sequence[str], mode_names: Sequence[str]) -> Optional[str]:
  """The error line for an unknown --mode value, with the nearest mode(s) suggested; None when it is
  known."""
  for value in flag_values(argv, 'mode'):
    if value in mode_names:
      continue
    # 'train_everything': 'train', ...
    words = [word for word in re.split(r'[^a-z]+', value.lower()) if word]
    intents = [MODE_INTENTS[word] for word in words if word in MODE_INTENTS]
    nearest = intents[0] if intents else difflib.get_close_matches(
        value.lower(), mode_names, n=2, cutoff=0.6)
    hint = f' did you mean {" or ".join(f"--mode={m}" for m in nearest)}?' if nearest else ''
    return (f'unknown --mode={value}:{hint} The modes are: {", ".join(mode_names)} (see '
            'docs/running.md)')
  return None


def config_file_error(path: Optional[str]) -> Optional[str]:
  """The error line for a --config value that gives no config, else None.

  Args:
    path: the --config value ('FILE.py' or 'FILE.py:ARG', ARG passed to get_config), None when not
      given.

  Returns:
    None when FILE defines a get_config() that returns a ConfigDict; else one line saying what is
    wrong.
  """
  if not path:
    return (
        f'--config is required: give a config file, e.g. {CONFIG_EXAMPLE} (the '
        'README\'s Quickstart); configs/ holds one per data set and stage')
  file, *arg = path.split(':', 1)
  if not os.path.isfile(file):
    return f'no config file {file}: give one of configs/*.py, e.g. {CONFIG_EXAMPLE}'
  if not file.endswith('.py'):
    return (f'{file} is not a config file (a Python file): give one of configs/*.py, e.g. '
            f'{CONFIG_EXAMPLE}')
  try:
    spec = importlib.util.spec_from_file_location('_config_file_check', file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as err:
    return f'config file {file} does not parse: line {err.lineno}: {err.msg}'
  except Exception as err:  # pylint: disable=broad-except
    # (whatever the file raises, reported in one line)
    return f'config file {file} fails to load: {type(err).__name__}: {err}'
  if not callable(getattr(module, 'get_config', None)):
    return (
        f'config file {file} defines no get_config(): a config file returns its '
        f'ml_collections.ConfigDict from get_config() (see configs/tiny.py), e.g. {CONFIG_EXAMPLE}')
  try:
    config = module.get_config(*arg)
  except Exception as err:  # pylint: disable=broad-except
    return f'get_config() of {path} raised {type(err).__name__}: {err}'
  if not isinstance(config, ml_collections.ConfigDict):
    return (f'get_config() of {path} returned {type(config).__name__}, not an '
            'ml_collections.ConfigDict')
  return None


# (source file, message pattern) of library messages about the library's own internals, which no
# user can act on.
NOISE = (
    # tensorflow_datasets reads its own deprecated TensorInfo.dtype field (tfds.testing.mock_data in
    # --dry_run).
    ('tensorflow_datasets/core/features/feature.py', re.compile(r'`\w+\.dtype` is deprecated')),
    # tfds looking for a data set that is not prepared; data.check_available's error line says so,
    # with the fix.
    ('tensorflow_datasets/core/utils/file_utils.py', re.compile(r'Variant folder %s has no %s')),
)


def is_library_noise(record: pylogging.LogRecord) -> bool:
  """Whether a log record is one of NOISE."""
  path = record.pathname.replace(os.sep, '/')
  return any(path.endswith(source) and pattern.match(str(record.msg)) for source, pattern in NOISE)
