"""One function per `main.py --mode` (modes.registry.MODES); main.py only parses flags and
dispatches through it.

MODES and the mode functions (`from modes import MODES, run_pipeline`) load on first use, so that
modes.command_line, which main.py consults before anything else, imports without JAX: a command that
cannot start says so in a fraction of a second.
"""

import importlib

_LAZY = ('MODES', 'run_distill', 'run_fid', 'run_pipeline', 'run_sample', 'run_sweep',
         'run_transfer')


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module('modes.registry'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
