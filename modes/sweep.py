"""--mode=sweep: the pipeline once per override point of the config's get_sweep(), each in its own
workdir."""

import importlib.util
import re
import shlex
import time

import jax
import ml_collections
from jax.experimental import multihost_utils
from absl import logging

from distill.stages import stage_dir
from modes.pipeline import run_pipeline
from modes.validation import ConfigError, validate_config
from train import files, records


def load_config_module(config_path: str):
  """The config file at config_path as a module (its get_config() and, for a sweep, get_sweep())."""
  spec = importlib.util.spec_from_file_location('_sweep_config', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(config_path: str) -> list[dict]:
  """The override points of get_sweep() in the config file at config_path."""
  module = load_config_module(config_path)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(
        f'{config_path} has no get_sweep(): it lists the sweep points as override dicts')
  return module.get_sweep()


def _name_value(value) -> str:
  """2.0 -> '2', (0.0, 1.0) -> '0+1', 'x' -> 'x'."""
  if isinstance(value, (tuple, list)):
    return '+'.join(_name_value(v) for v in value)
  return f'{value:g}' if isinstance(value, float) else f'{value}'


def point_name(overrides: dict) -> str:
  """'distill.w_max=2,stage2.num_steps=100': a directory name, one `key=value` per override (tuples
  as 'a+b')."""
  text = ','.join(f'{key}={_name_value(value)}' for key, value in overrides.items())
  return re.sub(r'[^A-Za-z0-9._,=+-]+', '_', text) or 'base'


def set_dotted(config, key: str, value) -> None:
  """config.a.b = value for key 'a.b'; a key the config lacks raises ConfigError naming it."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"unknown sweep key '{key}': the config has no such field")
  try:
    node[leaf] = value
  except TypeError as err:
    raise ConfigError(f"sweep key '{key}': {err}") from err


def point_config(config, overrides: dict, workdir: str):
  """A copy of config with the overrides applied and workdir set, validated."""
  point = config.copy_and_resolve_references()
  for key, value in overrides.items():
    set_dotted(point, key, value)
  point.workdir = workdir
  validate_config(point)
  return point


def _cli_value(value) -> str:
  return value if isinstance(value, str) else repr(value)


def pipeline_command(config_path: str, point, overrides: dict, defaults) -> str:
  """The main.py command that runs one point: its overrides, then every other field that differs
  from defaults."""
  values, default_values = records.flatten(point.to_dict()), records.flatten(defaults.to_dict())
  changed = [
      k for k, v in values.items()
      if k not in overrides and k != 'workdir' and v != default_values.get(k)
  ]
  args = ['python', 'main.py', f'--config={config_path}', '--mode=pipeline',
          f'--config.workdir={point.workdir}']
  args += [f'--config.{key}={_cli_value(values[key])}' for key in [*overrides, *changed]]
  return shlex.join(args)


# in chain order: a stage is shared only if the ones before it are
SHARED_STAGES = ('teacher', 'stage1')


def stage_inputs(config, stage: str) -> str:
  """Every config field stage's checkpoint depends on (`records.stage_inputs`, the definition a
  rerun's refusal of a stale stage uses too), as one string: equal strings train equal
  checkpoints."""
  return repr(sorted(records.stage_inputs(config, stage).items()))


def reuse_stages(point, trained: dict) -> list[str]:
  """Copies into point's workdir the stages an earlier point trained from the same inputs; returns
  their names.

  trained maps (stage, stage_inputs) to the workdir of the point that trained it. A stage already in
  point's workdir (a rerun) is kept as it is.
  """
  reused = []
  for stage in SHARED_STAGES:
    source = trained.get((stage, stage_inputs(point, stage)))
    if source is None:
      break
    target = stage_dir(point.workdir, stage)
    if not files.exists(target):
      files.copy_tree(stage_dir(source, stage), target)
      logging.info('[sweep] %s: reusing %s of %s', point.workdir, stage, source)
    reused.append(stage)
  return reused


def _write_index(path: str, rows: list[dict]) -> None:
  lines = [
      '# Sweep', '',
      '| point | workdir | reused from an earlier point | pipeline wall time (s, this invocation) '
      '| summary |', '|---|---|---|---|---|']
  lines += [f'| `{r["name"]}` | `{r["workdir"]}` | {r["reused"]} | {r["seconds"]} '
            f'| [summary.md]({r["name"]}/results/summary.md) |' for r in rows]
  files.write_text(path, '\n'.join(lines) + '\n')


def run_sweep(config, *, config_path: str, print_only: bool = False, points=None) -> list[str]:
  """Runs the pipeline for every point (get_sweep() of config_path unless points is given) in turn.

  Each point runs in <config.workdir>/sweep/<point name>; <config.workdir>/sweep/index.md lists
  them. A point whose teacher (and stage 1) would be trained from the same config fields as an
  earlier point's gets a copy of it (reuse_stages): a sweep over distillation fields trains one
  teacher. Every point is built and validated before any runs. print_only prints one main.py command
  per point (for a cluster launcher) and runs nothing. Returns the points' workdirs.
  """
  points = load_sweep(config_path) if points is None else points
  sweep_dir = files.join(config.workdir, 'sweep')
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ConfigError(f'sweep points repeat: {names}')
  configs = [point_config(config, p, files.join(sweep_dir, name)) for p, name in zip(points, names)]
  if print_only:
    defaults = load_config_module(config_path).get_config()
    for overrides, point in zip(points, configs):
      print(pipeline_command(config_path, point, overrides, defaults))
    return [c.workdir for c in configs]
  rows, trained = [], {}
  for i, (name, point) in enumerate(zip(names, configs)):
    logging.info('[sweep] point %d/%d: %s', i + 1, len(configs), name)
    start = time.time()
    reused = reuse_stages(point, trained) if jax.process_index() == 0 else list(SHARED_STAGES)
    # every process sees the copies before any looks for a trained stage
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'sweep reuse {name}')
    run_pipeline(point)
    for stage in SHARED_STAGES:
      trained.setdefault((stage, stage_inputs(point, stage)), point.workdir)
    sources = {
        stage:
            names[[c.workdir for c in configs].index(trained[(stage, stage_inputs(point, stage))])]
        for stage in reused
    }
    rows.append(
        dict(name=name, workdir=point.workdir, seconds=round(time.time() - start, 1),
             reused=', '.join(f'{stage} (`{source}`)' for stage, source in sources.items()) or '-'))
    if jax.process_index() == 0:
      _write_index(files.join(sweep_dir, 'index.md'), rows)
  logging.info('[sweep] index in %s', files.join(sweep_dir, 'index.md'))
  return [c.workdir for c in configs]
