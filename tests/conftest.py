"""Shared fixtures: tiny configs and one trained toy-2D run (teacher, stage 1, two stage-2 rounds).

Two tiers: `pytest tests` runs the core (the method: math, samplers, objectives, state, models,
data, distillation, evaluation, and a tiny end-to-end run); `pytest --integration tests` adds the
files marked `pytestmark = pytest.mark.integration` (the machinery around it: resume and checkpoint
refusals, pre-emption, fault injection, several devices and processes, remote workdirs, importing
diffusers teachers, the command line, logs, docs, the notebook, benchmarks). CI runs both."""

import gc
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # pylint: disable=wrong-import-position
import train_toy_run  # pylint: disable=wrong-import-position
from train.mesh import configure_cpu_compiler  # pylint: disable=wrong-import-position

# Before a test starts a JAX backend, as main.py does, but at LLVM level 0: the tests' programs are
# the same HLO as main.py's, and level 0 compiles them faster (docs/results.md) while their run
# time is small; the main.py processes the tests start inherit the level. Processes started with
# main_level_env() run at main.py's level instead: the toy run's training (train_toy_run.py:
# thousands of steps, bound by run time, which level 0 lengthens) and the fault injection and
# several-process runs (as a user's); the test of that level sets XLA_FLAGS itself.
configure_cpu_compiler(level=0)


def main_level_env() -> dict:
  """The environment of a process run as a user's: on the CPU, an XLA_FLAGS without the tests'
  compiler level (main.py's own) or a device count (one CPU device)."""
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')


# the one expected skip reason
PAPER_SCALE_SKIP = 'paper-scale step on the CPU: run with --paper-scale'
_UNEXPECTED_SKIPS = []  # 'nodeid: reason' of every other skip in this session
# the fault-injection test's seed and kill points (record_property), for the summary
_FAULT_INJECTION = []
# fixtures that train something (toy_run here, test_eval.py's classifier): each on one xdist worker
SHARED_FIXTURES = frozenset({'toy_run', 'trained_classifier'})
# the compilation cache this process made for the run (pytest_configure), removed at its end
_CREATED_CACHE = []


def pytest_unconfigure(config):
  del config
  for path in _CREATED_CACHE:
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_finish(session):
  """Moves what the imports and the collection made out of the garbage collector's reach (they live
  to the end): its full collections then scan only what the tests make."""
  del session
  gc.collect()
  gc.freeze()


def pytest_addoption(parser):
  parser.addoption(
      '--paper-scale', action='store_true',
      help='also run the tests marked paper_scale (a full-size network step on this CPU each)')
  parser.addoption(
      '--fail-on-unexpected-skip', action='store_true',
      help='fail the run when a test skips for any reason but the opt-in paper-scale marker (CI)')
  parser.addoption(
      '--integration', action='store_true',
      help='also run the tests marked integration (the machinery around the method; CI runs them)')


def pytest_configure(config):
  # One compilation cache for every main.py the tests start (main.py keeps a cache set here instead
  # of its workdir's): the tiny configs' programs compile once per run, not once per workdir. Set
  # in the controller, before pytest-xdist starts its workers, which inherit it.
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    _CREATED_CACHE.append(tempfile.mkdtemp(prefix='jax_cache_'))
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _CREATED_CACHE[0]
  config.addinivalue_line(
      'markers', 'paper_scale: compiles and steps a paper-size network on the CPU (minutes '
      'and ~12 GB each); run with --paper-scale')
  config.addinivalue_line(
      'markers', 'integration: tests of the machinery around the method (the second tier); '
      'run with --integration')


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
  """Tests using a trained fixture (SHARED_FIXTURES) share one xdist worker (it is trained once, not
  once per worker); tests marked paper_scale are skipped unless --paper-scale is given, and tests
  marked integration are deselected unless --integration is given, so the default suite stays
  fast."""
  if not config.getoption('--integration'):
    deselected = [item for item in items if item.get_closest_marker('integration')]
    if deselected:
      config.hook.pytest_deselected(items=deselected)
      items[:] = [item for item in items if not item.get_closest_marker('integration')]
  skip = pytest.mark.skip(reason=PAPER_SCALE_SKIP)
  for item in items:
    for fixture in SHARED_FIXTURES.intersection(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.xdist_group(fixture))
    if item.get_closest_marker('paper_scale') and not config.getoption('--paper-scale'):
      item.add_marker(skip)


def pytest_runtest_logreport(report):
  """Collects skips other than the paper-scale opt-in and the fault-injection plan (under
  pytest-xdist the controller sees every report and its recorded properties, though not the workers'
  prints)."""
  if report.when == 'call':
    _FAULT_INJECTION.extend(f'{name}: {value}' for name, value in report.user_properties
                            if name.startswith('fault_injection'))
  if report.skipped and not hasattr(report, 'wasxfail'):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if PAPER_SCALE_SKIP not in reason:
      _UNEXPECTED_SKIPS.append(f'{report.nodeid}: {reason}')


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus
  if _FAULT_INJECTION:
    terminalreporter.write_line('fault injection (replay with FAULT_INJECTION_SEED=<seed>):')
    for line in _FAULT_INJECTION:
      terminalreporter.write_line(f'  {line}')
  if _UNEXPECTED_SKIPS:
    failing = config.getoption('--fail-on-unexpected-skip')
    terminalreporter.write_line(
        f'{len(_UNEXPECTED_SKIPS)} unexpected skip(s)'
        f'{" (--fail-on-unexpected-skip: the run fails)" if failing else ""}:', red=failing)
    for line in _UNEXPECTED_SKIPS:
      terminalreporter.write_line(f'  {line}')


def pytest_sessionfinish(session, exitstatus):
  if (_UNEXPECTED_SKIPS and session.config.getoption('--fail-on-unexpected-skip')
      and exitstatus == pytest.ExitCode.OK):
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def tiny_config(workdir, **stage_steps):
  """configs/tiny.py in workdir; stage_steps like train=40 sets that section's num_steps."""
  config = tiny.get_config()
  config.workdir = str(workdir)
  for section, steps in stage_steps.items():
    config[section].num_steps = steps
  return config


def randomise_zero_leaves(params, seed=2):
  """params with the zero-initialised layers given random values (0.1 N(0, 1)), so every path of
  the network carries signal, as in a trained one."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # numpy's generator: a jax.random.normal per leaf shape would compile one program each
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      x if np.any(np.asarray(x)) else jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
      for x in leaves
  ])


class Killed(Exception):
  """Raised by kill_after's data iterator: a job killed mid-run."""


def kill_after(monkeypatch, num_batches):
  """Makes the data iterator raise after num_batches batches, like a job killed mid-run."""
  from distill import stages  # pylint: disable=g-import-not-at-top
  real = stages.data.make_train_iterator
  count = {'n': 0}

  def iterator(*args, **kwargs):
    for batch in real(*args, **kwargs):
      count['n'] += 1
      if count['n'] > num_batches:
        raise Killed()
      yield batch

  monkeypatch.setattr(stages.data, 'make_train_iterator', iterator)


@pytest.fixture(scope='session')
def toy_run(tmp_path_factory):
  """The toy-2D run of tests/train_toy_run.py, trained in a process of its own at main.py's
  compiler level; returns its config."""
  workdir = tmp_path_factory.mktemp('toy_run')
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_toy_run.py')
  result = subprocess.run([sys.executable, script, str(workdir)], capture_output=True, text=True,
                          env=main_level_env(), check=False)
  if result.returncode:
    pytest.fail(f'{script} failed:\n{result.stderr[-4000:]}', pytrace=False)
  return train_toy_run.toy_run_config(workdir)


def stub_fid_scoring(monkeypatch) -> list:
  """run_fid on a tiny config with no checkpoints: every method 'exists' and a cell is a stand-in
  row; returns the list that gets one (sampler, steps, w) per evaluated cell."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from modes import fid as modes_fid  # pylint: disable=g-import-not-at-top
  evaluated = []

  def evaluate_cell(loaded, method, w, **kwargs):
    del loaded, kwargs
    evaluated.append((method.sampler, method.steps, w))
    return dict(method=method.name, sampler=method.sampler, steps=method.steps, nfe=method.nfe, w=w,
                num_samples=1, fid=1.0, is_mean=1.0, is_std=0.0, accuracy='', seconds=0.0)

  monkeypatch.setattr(modes_fid, 'existing', lambda methods: methods)
  monkeypatch.setattr(modes_fid.records, 'checkpoint_id', lambda ckpt_dir: 'fixed')
  monkeypatch.setattr(modes_fid, 'load_cached', lambda cache, ckpt_dir: None)
  monkeypatch.setattr(modes_fid, 'reference_stats', lambda *args: (np.zeros(2), np.eye(2)))
  monkeypatch.setattr(modes_fid, 'evaluate_cell', evaluate_cell)
  return evaluated
