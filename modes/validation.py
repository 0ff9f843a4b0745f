"""Config sanity checks: each bad value gives one ConfigError line that names the field and the
fix."""

import math

from data import FOLDER, DataError, dataset_info
from data.folder import SPLITS as FOLDER_SPLITS
from distill.objectives import W_DISTRIBUTIONS
from diffusion import (
    BETA_SCHEDULES, DDPM_VARIANCES, DISCRETE_FIELDS, PARAMETRIZATIONS, SCHEDULES, WEIGHTINGS)
from eval import reference_stats as standard_stats
from models import COMPUTE_DTYPES, MODEL_NAMES
from models.embeddings import GUIDANCE_OPTIONS
from models.diffusers_import import FolderError, complete_config
from samplers.samplers import SAMPLERS

OPTIMIZER_SECTIONS = ('train', 'stage1', 'stage2', 'encoder', 'direct')
LR_DECAYS = ('constant', 'linear')  # train/state.py learning_rate_schedule
# The optimizer sections each --mode trains ('distill' trains the one distill.stage names).
MODE_SECTIONS = {'teacher': ('train',), 'stage1': ('stage1',), 'stage2': ('stage2',),
                 'encoder': ('encoder',), 'direct': ('direct',),
                 'pipeline': ('train', 'stage1', 'stage2')}
STAGES = ('stage1', 'stage2')


class ConfigError(ValueError):
  """An invalid config value."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _finite(value) -> bool:
  """Whether value is a real number, neither NaN nor infinite."""
  return isinstance(value, (int, float)) and math.isfinite(value)


def _check_guidance_weights(config) -> None:
  """Every guidance weight a mode trains or samples at is a finite number (a NaN w gives NaN
  samples)."""
  fields = {'distill.w_min': config.distill.w_min, 'distill.w_max': config.distill.w_max,
            'sample.guidance_w': config.sample.guidance_w,
            'transfer.w_encode': config.transfer.w_encode,
            'transfer.w_decode': config.transfer.w_decode,
            **{f'pipeline.guidance_ws[{i}]': w for i, w in enumerate(config.pipeline.guidance_ws)},
            **{f'eval.guidance_ws[{i}]': w for i, w in enumerate(config.eval.guidance_ws)},
            **{f'transfer.eval_ws[{i}]': w for i, w in enumerate(config.transfer.eval_ws)}}
  for name, w in fields.items():
    _require(_finite(w), f'{name} must be a finite guidance weight, got {w}')


def is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _check_optimizer(name: str, section) -> None:
  _require(section.batch_size > 0, f'{name}.batch_size must be > 0, got {section.batch_size}')
  _require(section.num_steps > 0, f'{name}.num_steps must be > 0, got {section.num_steps}')
  _require(_finite(section.lr) and section.lr > 0,
           f'{name}.lr must be a finite number > 0, got {section.lr}')
  _require(_finite(section.weight_decay) and section.weight_decay >= 0,
           f'{name}.weight_decay must be a finite number >= 0, got {section.weight_decay}')
  _require(0 <= section.warmup_steps,
           f'{name}.warmup_steps must be >= 0, got {section.warmup_steps}')
  _require(section.lr_decay in LR_DECAYS,
           f"unknown {name}.lr_decay '{section.lr_decay}'; choose one of: {', '.join(LR_DECAYS)}")
  _require(0 <= section.ema_decay < 1,
           f'{name}.ema_decay must be in [0, 1), got {section.ema_decay}')
  _require(section.grad_clip >= 0,
           f'{name}.grad_clip must be >= 0 (0 = off), got {section.grad_clip}')
  _require(section.log_every > 0, f'{name}.log_every must be > 0, got {section.log_every}')
  _require(section.checkpoint_every > 0,
           f'{name}.checkpoint_every must be > 0, got {section.checkpoint_every}')
  _require(section.keep_checkpoints >= 1, f'{name}.keep_checkpoints must be >= 1')
  _require(section.max_nonfinite_steps >= 1, f'{name}.max_nonfinite_steps must be >= 1')
  for key, scale in (section.get('lr_scales') or {}).items():
    _require(_finite(scale) and scale > 0,
             f'{name}.lr_scales.{key} must be a finite number > 0, got {scale}')


def _check_model(config, info) -> None:
  model = config.model
  _require(model.name in MODEL_NAMES,
           f"unknown model.name '{model.name}'; choose one of: {', '.join(MODEL_NAMES)}")
  _require(model.get('dtype', 'float32') in COMPUTE_DTYPES,
           f"unknown model.dtype '{model.get('dtype')}'; choose one of: "
           f"{', '.join(COMPUTE_DTYPES)}")
  if model.name == 'mlp':
    _require(not info.is_image,
             f"model.name 'mlp' is for vector data, not images of {info.name}: use 'unet'")
    return
  if model.name == 'diffusers_unet':
    _check_imported(config, info)
    return
  _require(info.is_image,
           f"model.name '{model.name}' needs image data; {info.name} is vector data: use 'mlp'")
  factor = 2 ** (len(model.ch_mult) - 1)
  size = info.shape[0]
  _require(
      size % factor == 0,
      f'image size {size} does not divide by the U-Net downsampling factor {factor} '
      f'(len(model.ch_mult)={len(model.ch_mult)}): use fewer levels in model.ch_mult')
  _require(model.ch % model.num_groups == 0,
           f'model.ch={model.ch} must be a multiple of model.num_groups='
           f'{model.num_groups}')
  _require(0 <= model.dropout < 1, f'model.dropout must be in [0, 1), got {model.dropout}')
  if model.name != 'ref_unet':
    return
  num_heads, head_dim = model.get('num_heads', 1), model.get('head_dim', 0)
  _require(num_heads >= 1, f'model.num_heads must be >= 1, got {num_heads}')
  _require(head_dim >= 0, f'model.head_dim must be >= 0 (0 = use model.num_heads), got {head_dim}')
  _require(isinstance(model.get('resblock_resample', True), bool),
           f"model.resblock_resample must be True or False, got {model.get('resblock_resample')!r}")
  head_split = f'model.head_dim={head_dim}' if head_dim > 0 else f'model.num_heads={num_heads}'
  # then every level's ch * mult channels split too
  _require(model.ch % (head_dim or num_heads) == 0,
           f'model.ch={model.ch} channels do not split into attention heads of {head_split}')


def _check_imported(config, info) -> None:
  """An imported teacher (configs/diffusers_teacher.py): its folder read, its images the data's."""
  model = config.model
  _require(
      bool(model.get('unet')),
      'model.unet is empty: give --config.model.folder=DIR (main.py fills the rest '
      'from it; in Python call modes.validation.prepare_config)')
  _require(info.is_image, f'an imported UNet2DModel needs image data; {info.name} is vector data')
  size, channels = model.unet['sample_size'], model.unet['in_channels']
  sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
  _require(
      sizes == info.shape[:2] and channels == info.shape[2],
      f'the teacher takes {channels}-channel '
      f'{sizes[0]}x{sizes[1]} images (sample_size, in_channels); {info.name} has shape '
      f'{info.shape}: pick its dataset with --config.data.name')
  _require(model.dropout == -1 or 0 <= model.dropout < 1,
           f'model.dropout must be -1 (config.json\'s) or in [0, 1), got {model.dropout}')


def _check_discrete(diffusion) -> None:
  _require(all(key in diffusion for key in DISCRETE_FIELDS),
           "diffusion.schedule 'discrete' is an imported teacher's: use "
           "configs/diffusers_teacher.py")
  _require(
      diffusion.beta_schedule in BETA_SCHEDULES,
      f"unknown diffusion.beta_schedule '{diffusion.beta_schedule}'; "
      f"choose one of: {', '.join(BETA_SCHEDULES)}")
  _require(diffusion.num_train_timesteps >= 2, f'diffusion.num_train_timesteps must be >= 2, got '
           f'{diffusion.num_train_timesteps}')


def prepare_config(config) -> None:
  """What main.py does after the command-line overrides: fills what an imported teacher's folder
  determines (models.diffusers_import.complete_config), then validate_config. Raises ConfigError
  (one line)."""
  if config.model.name == 'diffusers_unet':
    try:
      complete_config(config, num_classes=dataset_info(config.data).num_classes)
    except (FolderError, DataError) as err:
      raise ConfigError(str(err)) from err
  validate_config(config)


def _check_halving(config, name: str) -> None:
  section = config[name]
  _require(is_power_of_two(section.start_steps) and section.start_steps >= 2,
           f'{name}.start_steps must be a power of two >= 2, got {section.start_steps}')
  _require(is_power_of_two(section.final_steps),
           f'{name}.final_steps must be a power of two, got {section.final_steps}')
  _require(
      section.final_steps < section.start_steps,
      f'{name}.final_steps ({section.final_steps}) must be '
      f'smaller than {name}.start_steps ({section.start_steps})')
  if 'off_grid_fraction' in section:
    _require(0 <= section.off_grid_fraction <= 1,
             f'{name}.off_grid_fraction must be in [0, 1], got {section.off_grid_fraction}')


def validate_config(config) -> None:
  """Raises ConfigError on the first invalid field."""
  _require(bool(config.workdir),
           'workdir is empty: give --config.workdir=DIR (checkpoints, logs and results go there)')
  try:
    # a folder is scanned and checked here, before anything is written
    info = dataset_info(config.data)
  except DataError as err:
    raise ConfigError(str(err)) from err
  _check_model(config, info)
  diffusion = config.diffusion
  _require(diffusion.schedule in SCHEDULES,
           f"unknown diffusion.schedule '{diffusion.schedule}'; choose one of: "
           f"{', '.join(SCHEDULES)}")
  _require(_finite(diffusion.logsnr_min) and _finite(diffusion.logsnr_max),
           f'diffusion.logsnr_min and logsnr_max must be finite, got {diffusion.logsnr_min} and '
           f'{diffusion.logsnr_max}')
  _require(diffusion.logsnr_min < diffusion.logsnr_max,
           'diffusion.logsnr_min must be < diffusion.logsnr_max')
  if diffusion.schedule == 'discrete':
    _check_discrete(diffusion)
  _require(diffusion.parametrization in PARAMETRIZATIONS,
           f"unknown diffusion.parametrization '{diffusion.parametrization}'; "
           f"choose one of: {', '.join(PARAMETRIZATIONS)}")
  _require(diffusion.loss_weighting in WEIGHTINGS,
           f"unknown diffusion.loss_weighting '{diffusion.loss_weighting}'; choose one of: "
           f"{', '.join(WEIGHTINGS)}")
  for name in OPTIMIZER_SECTIONS:
    _check_optimizer(name, config[name])
  _require(
      config.stage1.get('loss_weighting', '') in ('', *WEIGHTINGS),
      f"unknown stage1.loss_weighting "
      f"'{config.stage1.get('loss_weighting')}'; choose '' (diffusion.loss_weighting's) or one of: "
      f"{', '.join(WEIGHTINGS)}")
  _require(0 <= config.train.p_uncond < 1,
           f'train.p_uncond must be in [0, 1), got {config.train.p_uncond}')
  _require(config.distill.stage in STAGES,
           f"unknown distill.stage '{config.distill.stage}'; choose stage1 or stage2")
  _check_guidance_weights(config)
  _require(0 <= config.distill.w_zero_fraction <= 1,
           f'distill.w_zero_fraction must be in [0, 1], got {config.distill.w_zero_fraction}')
  _require(
      config.distill.w_min <= config.distill.w_max,
      f'distill.w_min ({config.distill.w_min}) > distill.w_max '
      f'({config.distill.w_max}): the guidance range is reversed, swap them')
  _require(config.distill.dropout == -1 or 0 <= config.distill.dropout < 1,
           'distill.dropout must be -1 (the teacher\'s) or in [0, 1), got '
           f'{config.distill.dropout}')
  _require(config.distill.w_distribution in W_DISTRIBUTIONS, f"unknown distill.w_distribution "
           f"'{config.distill.w_distribution}'; choose one of: {', '.join(W_DISTRIBUTIONS)}")
  for field in GUIDANCE_OPTIONS:
    _require(not config.distill.get(field) or config.model.name == 'unet',
             f"distill.{field} needs model.name 'unet' (got '{config.model.name}'): set it False")
  _require(_finite(config.distill.guidance_w_scale) and config.distill.guidance_w_scale > 0,
           'distill.guidance_w_scale must be a finite number > 0, got '
           f'{config.distill.guidance_w_scale}')
  _require(config.distill.guidance_w_scale == 250 or config.model.name == 'unet',
           f"distill.guidance_w_scale needs model.name 'unet' (got '{config.model.name}'): "
           "leave it at 250")
  _check_halving(config, 'stage2')
  _check_halving(config, 'encoder')
  _check_halving(config, 'direct')
  _require(config.sample.sampler in SAMPLERS,
           f"unknown sample.sampler '{config.sample.sampler}'; choose one of: "
           f"{', '.join(SAMPLERS)}")
  _require(
      config.sample.num_steps >= 0, f'sample.num_steps must be >= 0 (0 = the checkpoint default), '
      f'got {config.sample.num_steps}')
  _require(config.sample.per_class > 0,
           f'sample.per_class must be > 0, got {config.sample.per_class}')
  _check_ddpm_variance('sample', config.sample.ddpm_variance)
  _require(all(n > 0 for n in config.pipeline.teacher_steps),
           'pipeline.teacher_steps must all be > 0')
  _check_eval(config, info)
  _check_quality(config)
  _check_teacher_data(config, info)
  profile = config.profile
  _require(
      profile.start_step >= 1 and profile.num_steps >= 0, 'profile.start_step must be >= 1 and '
      f'profile.num_steps >= 0 (0 = no trace), got {profile.start_step} and {profile.num_steps}')
  _require(profile.flops in ('auto', 'on', 'off'),
           f"unknown profile.flops '{profile.flops}'; choose auto, on or off")


def validate_for_devices(config, mode: str, device_count: int) -> None:
  """The batch sizes of the sections mode trains must split evenly over device_count devices."""
  sections = MODE_SECTIONS.get(mode, ())
  if mode == 'distill':
    sections = (config.distill.stage,)
  for name in sections:
    batch_size = config[name].batch_size
    _require(
        batch_size % device_count == 0,
        f'{name}.batch_size {batch_size} does not split over {device_count} '
        f'devices: use a multiple of {device_count} (or --cpu_devices on a CPU)')


def _check_quality(config) -> None:
  """The pipeline's per-stage fidelity fields (modes/stage_quality.py)."""
  pipeline = config.pipeline
  _require(pipeline.quality_samples >= 0, f'pipeline.quality_samples must be >= 0 (0 = off), got '
           f'{pipeline.quality_samples}')
  if pipeline.quality_samples == 0:
    return  # no fidelity table: its other fields are not used
  _require(pipeline.quality_steps > 0,
           f'pipeline.quality_steps must be > 0, got {pipeline.quality_steps}')
  _require(
      0 < pipeline.floor_steps < pipeline.quality_steps, f'pipeline.floor_steps must be in [1, '
      f'pipeline.quality_steps={pipeline.quality_steps}), got {pipeline.floor_steps}: '
      'the floor is the teacher at fewer steps than its reference')
  _require(
      len(pipeline.quality_ws) > 0, 'pipeline.quality_ws must name at least one guidance weight')
  _require(
      pipeline.quality_samples % config.eval.batch_size == 0, f'pipeline.quality_samples '
      f'({pipeline.quality_samples}) must be a multiple of eval.batch_size '
      f'({config.eval.batch_size})')


def _check_ddpm_variance(section: str, value) -> None:
  _require(value in DDPM_VARIANCES,
           f"unknown {section}.ddpm_variance '{value}'; choose one of: {', '.join(DDPM_VARIANCES)}")


def _check_eval(config, info) -> None:
  ev = config.eval
  _require(ev.extractor in ('inception', 'classifier', 'toy2d'),
           f"unknown eval.extractor '{ev.extractor}'; choose inception, classifier or toy2d")
  _require(ev.extractor != 'classifier' or info.name == 'digits',
           f"eval.extractor 'classifier' is the digits classifier; for {info.name} use 'inception'")
  _require(ev.extractor != 'toy2d' or info.name == 'toy2d',
           "eval.extractor 'toy2d' is only for data.name toy2d")
  _require(ev.num_samples > 0 and ev.batch_size > 0,
           'eval.num_samples and eval.batch_size must be > 0')
  _require(isinstance(ev.num_seeds, int) and ev.num_seeds >= 1,
           f'eval.num_seeds must be an integer >= 1 (noise draws per cell), got {ev.num_seeds!r}')
  _require(
      ev.num_samples % ev.batch_size == 0,
      f'eval.num_samples ({ev.num_samples}) must be a multiple of '
      f'eval.batch_size ({ev.batch_size})')
  _require(all(n > 0 for n in (*ev.teacher_steps, *ev.teacher_ddpm_steps, *ev.teacher_clipped_steps,
                                *ev.stage1_steps, *ev.student_steps)),
           'eval step counts must all be > 0')
  _check_ddpm_variance('eval', ev.ddpm_variance)
  _require(isinstance(ev.quantize_uint8, bool),
           f'eval.quantize_uint8 must be True or False, got {ev.quantize_uint8!r}')
  _require(not ev.quantize_uint8 or info.is_image,
           f'eval.quantize_uint8 rounds images to uint8 levels; {info.name} is vector '
           'data: set it False')
  _require(
      info.name != FOLDER or ev.reference_split in FOLDER_SPLITS,
      f"eval.reference_split '{ev.reference_split}':"
      " a folder data set has one split, 'train' (the whole folder): set "
      "--config.eval.reference_split=train")
  for section in (config.sample, ev):
    _require(isinstance(section.export_samples, bool), 'export_samples must be True or False, got '
             f'{section.export_samples!r}')
  _require(not (ev.export_samples or config.sample.export_samples) or info.is_image,
           f'export_samples writes images; {info.name} is vector data: set it False')
  if ev.reference_stats:
    try:
      reference = standard_stats.inspect(ev.reference_stats)
      standard_stats.check_dim(reference, extractor=ev.extractor,
                               feature_dim=standard_stats.extractor_feature_dim(ev.extractor))
    except DataError as err:
      raise ConfigError(str(err)) from err


def _check_teacher_data(config, info) -> None:
  """A folder or tfds:NAME data set must be what the teacher of config.workdir (if it has one) was
  trained on: class count, class names and image shape, so a distilled student or a score never
  mixes two data sets. (A built-in data set is fixed by its name; loading a checkpoint checks that,
  train/records.py.)"""
  if not info.class_names:
    return
  from distill.stages import stage_dir  # pylint: disable=g-import-not-at-top  (imports JAX)
  from train import checkpoint, records  # pylint: disable=g-import-not-at-top
  teacher_dir = stage_dir(config.workdir, 'teacher')
  try:
    if checkpoint.latest_step(teacher_dir) is None:
      return
    record = records.read(teacher_dir)
  except (checkpoint.CheckpointError, OSError, ValueError):
    return  # a damaged teacher is reported, with its fix, where it is loaded
  names, shape = record.get('class_names') or [], tuple(record.get('x_shape', info.shape))
  _require(
      record.get('num_classes', info.num_classes) == info.num_classes,
      f'the data ({_data_name(config)}) has {info.num_classes} classes but the teacher in '
      f'{teacher_dir} was trained on {record["num_classes"]}{_listed(names)}: use its data or '
      'another --config.workdir')
  if names and info.class_names and tuple(names) != info.class_names:
    k = next(k for k, (a, b) in enumerate(zip(info.class_names, names)) if a != b)
    raise ConfigError(
        f"the data's classes are not the teacher's ({teacher_dir}): class {k} is "
        f"'{info.class_names[k]}' here, '{names[k]}' there: use its data or another "
        "--config.workdir")
  _require(
      shape == tuple(info.shape),
      f'the data ({_data_name(config)}) has examples of shape {tuple(info.shape)} '
      f'but the teacher in {teacher_dir} was trained on {shape}: use its data and '
      'data.resolution or another --config.workdir')


def _data_name(config) -> str:
  return config.data.path if config.data.name == FOLDER else config.data.name


def _listed(names) -> str:
  shown = ', '.join(names[:5]) + (', ...' if len(names) > 5 else '')
  return f' ({shown})' if names else ''
