"""Diffusers teachers: a UNet2DModel folder (+ its scheduler's config) as this repo's teacher,
without PyTorch.

A teacher folder holds `config.json` and `diffusion_pytorch_model.safetensors` (read with
safetensors' numpy loader); its `scheduler_config.json` lies in the same folder, in a sibling
`../scheduler/` (the folder is a pipeline's `unet/`), or the folder is a pipeline with `unet/` and
`scheduler/` inside. `complete_config` fills the config fields the folder determines;
`build_network` and `load_params` turn the filled model section into a
`models.diffusers_unet.DiffusersUNet` and its parameters. docs/import.md has the whole story.

Mapping onto this repo:
- the scheduler's discrete beta schedule (linear, scaled_linear, squaredcos_cap_v2;
  num_train_timesteps) becomes the 'discrete' log-SNR schedule (diffusion.discrete_logsnr); the
  network is fed the timestep of its log-SNR (diffusion.timestep_of_logsnr), fractional between the
  trained ones;
- prediction_type epsilon / v_prediction / sample -> parametrization eps / v / x;
- out_channels = 2 * in_channels (a learned-range variance) -> the variance half is dropped;
- the null label: one network with num_class_embeds = num_classes + 1 (the last row is the null
  class), or two networks (model.uncond_folder: num_class_embeds = num_classes and an unconditional
  one).
"""
import functools
import hashlib
import json
import os

import jax
import numpy as np

from diffusion.schedules import BETA_SCHEDULES, DISCRETE_FIELDS, discrete_logsnr_table
from models.diffusers_unet import DiffusersUNet, unet_fields

WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
PREDICTION_TYPES = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x'}
# a two-network teacher's unconditional network's parameters (DiffusersUNet.uncond)
UNCOND_KEY = 'uncond'
# Attention parameter names of checkpoints written before diffusers' Attention class (renamed on
# load there too).
_OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


class FolderError(ValueError):
  """A teacher folder that is missing, incomplete or not supported; the message names the fix."""


def _read_json(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def folder_files(folder: str) -> tuple[str, str, str]:
  """(config.json, weights, scheduler_config.json) paths of a teacher folder; FolderError naming
  what is missing."""
  if not os.path.isdir(folder):
    raise FolderError(
        f'no teacher folder {folder!r}: give a diffusers UNet2DModel folder (config.json, '
        f'{WEIGHTS_FILE})')
  unet_dir = os.path.join(folder, 'unet') if os.path.isdir(os.path.join(folder, 'unet')) else folder
  config, weights = os.path.join(unet_dir, 'config.json'), os.path.join(unet_dir, WEIGHTS_FILE)
  for path in (config, weights):
    if not os.path.isfile(path):
      other = [n for n in os.listdir(unet_dir) if n.endswith(('.bin', '.safetensors', '.ckpt'))]
      hint = (f' (found {", ".join(other)}: save it with save_pretrained(safe_serialization=True))'
              if other else '')
      raise FolderError(f'teacher folder {unet_dir} has no {os.path.basename(path)}{hint}')
  candidates = [os.path.join(unet_dir, 'scheduler_config.json'),
                os.path.join(os.path.dirname(os.path.abspath(unet_dir)), 'scheduler',
                             'scheduler_config.json'),
                os.path.join(folder, 'scheduler', 'scheduler_config.json')]
  for path in candidates:
    if os.path.isfile(path):
      return config, weights, path
  raise FolderError(
      f'no scheduler_config.json for {unet_dir}: looked in {", ".join(dict.fromkeys(candidates))}; '
      'save the training scheduler there (scheduler.save_pretrained(folder))')


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime: float) -> str:
  del size, mtime  # the cache key: a rewritten file is hashed again
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def weights_sha256(path: str) -> str:
  """sha256 of a weights file: the identity of an imported teacher in the records of its
  students."""
  stat = os.stat(path)
  return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime)


def scheduler_fields(scheduler: dict) -> dict:
  """A scheduler_config.json -> DISCRETE_FIELDS and the parametrization; FolderError for what is not
  supported."""
  name = scheduler.get('_class_name', 'the scheduler')
  if 'beta_schedule' not in scheduler:
    raise FolderError(
        f'{name} has no beta_schedule: only variance-preserving (DDPM-family) '
        'schedulers are supported')
  refused = []
  if scheduler.get('trained_betas') is not None:
    refused.append('trained_betas')
  if scheduler.get('rescale_betas_zero_snr'):
    refused.append('rescale_betas_zero_snr (a terminal log-SNR of -inf)')
  if scheduler['beta_schedule'] not in BETA_SCHEDULES:
    refused.append(f"beta_schedule '{scheduler['beta_schedule']}'")
  prediction = scheduler.get('prediction_type', 'epsilon')
  if prediction not in PREDICTION_TYPES:
    refused.append(f"prediction_type '{prediction}'")
  if refused:
    raise FolderError(
        f'{name} options not supported: {", ".join(refused)} (supported: beta_schedule '
        f'{", ".join(BETA_SCHEDULES)}; prediction_type {", ".join(PREDICTION_TYPES)})')
  return dict(
      num_train_timesteps=int(scheduler.get('num_train_timesteps', 1000)),
      beta_schedule=scheduler['beta_schedule'], beta_start=float(scheduler.get('beta_start', 1e-4)),
      beta_end=float(scheduler.get('beta_end', 0.02)), parametrization=PREDICTION_TYPES[prediction])


def read_unet_config(path: str) -> dict:
  """config.json -> the JSON-able architecture fields of DiffusersUNet; FolderError naming
  unsupported options."""
  try:
    fields = unet_fields(_read_json(path))
  except ValueError as err:
    raise FolderError(f'{path}: {err}') from err
  if fields['time_embedding_type'] == 'fourier':
    raise FolderError(
        f"{path}: time_embedding_type 'fourier' is score-SDE's variance-exploding form (fed sigma, "
        'its output divided by it): models.diffusers_unet computes it, but it is no DDPM-timestep '
        "teacher; import a 'positional' one")
  if fields['out_channels'] not in (fields['in_channels'], 2 * fields['in_channels']):
    raise FolderError(f'{path}: out_channels {fields["out_channels"]} is neither in_channels '
                      f'({fields["in_channels"]}) nor twice it (a learned-range variance)')
  return json.loads(json.dumps(fields))  # tuples -> lists, as the config and the records hold them


def _fill(section, key: str, value, name: str) -> None:
  """section[key] = value where it holds its placeholder ('' / 0 / None); FolderError if it was set
  to another."""
  if section[key] in ('', 0, None):
    section[key] = value
  elif section[key] != value:
    raise FolderError(
        f'--config.{name}.{key}={section[key]!r} disagrees with the teacher folder ({value!r}): '
        'drop the override')


def _check_classes(unet: dict, uncond: dict, num_classes: int, folder: str) -> None:
  embeds = unet['num_class_embeds']
  if uncond is None and embeds != num_classes + 1:
    raise FolderError(
        f'{folder} has num_class_embeds={embeds}; a one-network guided teacher needs '
        f'num_classes + 1 = {num_classes + 1} (the last is the null label), or give its '
        'unconditional partner as --config.model.uncond_folder')
  if uncond is not None and (embeds != num_classes or uncond['num_class_embeds'] is not None):
    raise FolderError(
        f'a two-network teacher needs num_class_embeds={num_classes} in {folder} and none in '
        f'model.uncond_folder, got {embeds} and {uncond["num_class_embeds"]}')


def complete_config(config, *, num_classes: int) -> None:
  """Fills what config.model.folder (and uncond_folder) determine, in place: the architecture
  (model.unet, model.uncond_unet), the weights' sha256, the network's scheduler
  (model.<DISCRETE_FIELDS>), and the diffusion section (its DISCRETE_FIELDS, parametrization,
  logsnr_min: the last timestep's log-SNR).

  Raises FolderError (one line) for a missing or unsupported folder, or an override that disagrees
  with it.
  """
  model = config.model
  if not model.folder:
    raise FolderError(
        'model.folder is empty: give --config.model.folder=DIR, a diffusers UNet2DModel folder')
  unet_json, weights, scheduler_json = folder_files(model.folder)
  unet, scheduler = read_unet_config(unet_json), scheduler_fields(_read_json(scheduler_json))
  uncond = None
  if model.uncond_folder:
    uncond_json, uncond_weights, uncond_scheduler = folder_files(model.uncond_folder)
    uncond = read_unet_config(uncond_json)
    if scheduler_fields(_read_json(uncond_scheduler)) != scheduler:
      raise FolderError(
          f'{model.folder} and {model.uncond_folder} were trained with different schedulers')
    _fill(model, 'uncond_weights_sha256', weights_sha256(uncond_weights), 'model')
  _check_classes(unet, uncond, num_classes, model.folder)
  model.unet, model.uncond_unet = unet, uncond
  _fill(model, 'weights_sha256', weights_sha256(weights), 'model')
  for key in DISCRETE_FIELDS:
    _fill(model, key, scheduler[key], 'model')
    _fill(config.diffusion, key, scheduler[key], 'diffusion')
  _fill(config.diffusion, 'parametrization', scheduler['parametrization'], 'diffusion')
  table = discrete_logsnr_table(**{key: scheduler[key] for key in DISCRETE_FIELDS})
  config.diffusion.logsnr_min = float(np.float32(table[-1]))


def _as_fields(unet) -> dict:
  unet = unet.to_dict() if hasattr(unet, 'to_dict') else dict(unet)
  return {key: tuple(value) if isinstance(value, list) else value for key, value in unet.items()}


def build_network(model_config, *, num_classes: int, guidance_input: bool, dtype) -> DiffusersUNet:
  """The DiffusersUNet a filled model section describes (model.dropout >= 0 replaces config.json's
  dropout)."""
  if not model_config.get('unet'):
    raise ValueError(
        'model.unet is empty: the config was not completed from model.folder (modes.validation.'
        'prepare_config does it)')
  common = dict(num_train_timesteps=model_config.num_train_timesteps,
                beta_schedule=model_config.beta_schedule, beta_start=model_config.beta_start,
                beta_end=model_config.beta_end, num_classes=num_classes, dtype=dtype)
  dropout = model_config.get('dropout', -1.0)
  with_dropout = lambda fields: dict(fields, dropout=dropout) if dropout >= 0 else fields
  uncond = model_config.get('uncond_unet')
  uncond = None if not uncond else DiffusersUNet(**with_dropout(_as_fields(uncond)), **common)
  return DiffusersUNet(**with_dropout(_as_fields(model_config.unet)), **common,
                       guidance_input=guidance_input, uncond=uncond)


def _torch_name(path: tuple) -> tuple[str, callable]:
  """A flax parameter path -> (the state dict key, the conversion of the PyTorch array to the flax
  layout)."""
  *modules, leaf = path
  if leaf == 'kernel':  # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; Linear [O, I] -> [I, O]
    return ('.'.join(modules + ['weight']), lambda a: a.transpose((2, 3, 1, 0))
            if a.ndim == 4 else a.T)
  renamed = {'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)  # GroupNorm, Embedding
  return '.'.join(modules + [renamed]), lambda a: a


def _new_attention_names(state_dict: dict) -> dict:
  def rename(key):
    parts = key.split('.')
    if len(parts) >= 2 and 'attentions' in parts and parts[-2] in _OLD_ATTENTION_NAMES:
      return '.'.join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key
  return {rename(key): value for key, value in state_dict.items()}


def convert_state_dict(state_dict: dict, abstract_params) -> dict:
  """A UNet2DModel state dict {key: array} -> flax params shaped like abstract_params
  (DiffusersUNet's own).

  FolderError when a parameter is missing, has another shape, or the state dict holds one the
  network lacks.
  """
  state_dict = _new_attention_names(state_dict)
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  leaves, used = [], set()
  for path, target in paths:
    key, convert = _torch_name(tuple(p.key for p in path))
    if key not in state_dict:
      raise FolderError(
          f'the weights have no {key}: the folder\'s config.json does not describe them')
    value = convert(np.asarray(state_dict[key], np.float32))
    if value.shape != tuple(target.shape):
      raise FolderError(
          f'{key} has shape {value.shape} after conversion, the network expects '
          f'{tuple(target.shape)}')
    leaves.append(value)
    used.add(key)
  unused = sorted(set(state_dict) - used)
  if unused:
    raise FolderError(
        f'the weights hold {len(unused)} parameters the network lacks, e.g. '
        f'{", ".join(unused[:3])}: config.json does not describe them')
  return jax.tree_util.tree_unflatten(treedef, leaves)


def load_params(model_config, abstract_params) -> dict:
  """The teacher's parameters from its folder(s), laid out as abstract_params (a two-network
  teacher's unconditional network under UNCOND_KEY); checked against the sha256 the config
  recorded."""
  # (only imports need it)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  folders = [(model_config.folder, model_config.weights_sha256)]
  if model_config.get('uncond_folder'):
    folders.append((model_config.uncond_folder, model_config.uncond_weights_sha256))
  params = []
  for (folder, expected), abstract in zip(
      folders, [abstract_params, abstract_params.get(UNCOND_KEY)]):
    weights = folder_files(folder)[1]
    if weights_sha256(weights) != expected:
      raise FolderError(
          f'{weights} changed since the config was completed (sha256 {expected[:12]}...): rerun')
    own = {k: v for k, v in abstract.items() if k != UNCOND_KEY}
    params.append(convert_state_dict(load_file(weights), own))
  return params[0] if len(params) == 1 else dict(params[0], **{UNCOND_KEY: params[1]})
