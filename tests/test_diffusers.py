"""Imported diffusers teachers (models/diffusers_unet.py, models/diffusers_import.py) against what
diffusers computes.

The references are fixtures written by tests/fixtures/make_diffusers_fixtures.py with PyTorch and
diffusers (its --check mode recomputes them); nothing here imports torch. The second tier: importing
another codebase's teacher is machinery around the method (tests/conftest.py).
"""

import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import diffusers_teacher
from diffusion import discrete_logsnr_table, guided_prediction, guidance_w_from_scale, schedule_of
from distill import stages
from models import diffusers_import
from models.denoiser import clip_x, make_denoise_fn
from models.diffusers_unet import DOWN_BLOCKS, UP_BLOCKS, DiffusersUNet, unet_fields
from modes import fid
from modes.sampling import LoadedCheckpoint, run_sample
from modes.validation import ConfigError, prepare_config
from samplers import make_sampler
from train import checkpoint, records

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'diffusers')
NETWORKS = ('attn_conv', 'scale_shift_resnet', 'fourier')
TEACHERS = {'teacher_tiny': ('',), 'teacher_null_class': ('',), 'teacher_pair': ('cond', 'uncond')}
NUM_CLASSES = 10  # the teachers' classes: the embedded digits'


def _config(teacher: str = 'teacher_tiny', workdir: str = '/tmp/unused'):
  """configs/diffusers_teacher.py on a fixture teacher, completed from its folder(s)."""
  config = diffusers_teacher.get_config()
  config.workdir = str(workdir)
  folders = [os.path.join(FIXTURES, teacher, role) for role in TEACHERS[teacher]]
  config.model.folder = folders[0]
  config.model.uncond_folder = folders[1] if len(folders) > 1 else ''
  prepare_config(config)
  return config


def _apply(network, params, *args, **kwargs):
  """network.apply as one compiled program (op by op, each of the U-Net's ops would compile on its
  own)."""
  return jax.jit(lambda p, *a: network.apply({'params': p}, *a, **kwargs))(params, *args)


def _fixture_network(name: str):
  """(DiffusersUNet, params, reference arrays) of a fixture network, its params converted by
  name."""
  folder = os.path.join(FIXTURES, name)
  with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
    network = DiffusersUNet(**unet_fields(json.load(f)))
  ref = dict(np.load(os.path.join(folder, 'reference.npz')))
  args = (jnp.asarray(ref['sample'].transpose(0, 2, 3, 1)), jnp.asarray(ref['timesteps']),
          jnp.asarray(ref['class_labels']) if 'class_labels' in ref else None)
  abstract = jax.eval_shape(
      lambda: network.init(jax.random.key(0), *args, method='forward'))['params']
  params = diffusers_import.convert_state_dict(
      load_file(os.path.join(folder, diffusers_import.WEIGHTS_FILE)), abstract)
  return network, params, args, ref


@pytest.mark.parametrize('name', NETWORKS)
def test_network_matches_diffusers_unet2dmodel(name):
  network, params, args, ref = _fixture_network(name)
  out = np.asarray(_apply(network, params, *args, method='forward'))  # [B, H, W, C]
  assert np.max(np.abs(out - ref['output'].transpose(0, 2, 3, 1))) <= 1e-4


def test_the_fixtures_cover_every_supported_block_and_option():
  seen = {}
  for name in (*NETWORKS, 'teacher_null_class'):
    with open(os.path.join(FIXTURES, name, 'config.json'), encoding='utf-8') as f:
      fields = unet_fields(json.load(f))
    for key in ('time_embedding_type', 'resnet_time_scale_shift', 'downsample_type',
                'upsample_type', 'flip_sin_to_cos', 'downsample_padding', 'mid_block_type',
                'center_input_sample'):
      seen.setdefault(key, set()).add(fields[key])
    seen.setdefault('blocks', set()).update(fields['down_block_types'] + fields['up_block_types'])
    seen.setdefault('heads', set()).add(fields['block_out_channels'][0] //
                                        (fields['attention_head_dim'] or 10**9))
  assert seen['blocks'] == set(DOWN_BLOCKS + UP_BLOCKS)
  assert seen['time_embedding_type'] == {'positional', 'fourier'}
  assert seen['resnet_time_scale_shift'] == {'default', 'scale_shift'}
  assert seen['downsample_type'] == seen['upsample_type'] == {'conv', 'resnet'}
  for key in ('flip_sin_to_cos', 'center_input_sample'):
    assert seen[key] == {True, False}, key
  assert seen['downsample_padding'] == {0, 1} and seen['mid_block_type'] == {'UNetMidBlock2D', None}
  assert {0, 2} <= seen['heads']  # one head (attention_head_dim None) and several


def test_old_checkpoints_attention_names_load():
  weights = load_file(os.path.join(FIXTURES, 'fourier', diffusers_import.WEIGHTS_FILE))
  # so the parity test above covers the renaming
  assert any('.attentions.0.query.' in key for key in weights)


def test_the_repo_interface_feeds_the_timestep_of_logsnr_and_drops_a_learned_range_channel():
  # out_channels 2 = learned range
  network, params, (sample, timesteps, _), _ = _fixture_network('fourier')
  network = network.clone(num_train_timesteps=1000, beta_schedule='linear')
  table = discrete_logsnr_table(
      num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02)
  logsnr = jnp.asarray(table[[3, 250, 998]], jnp.float32)
  out = _apply(network, params, sample, logsnr, jnp.zeros(3, jnp.int32), train=False)
  full = _apply(network, params, sample, jnp.array([3.0, 250.0, 998.0]), None, method='forward')
  assert out.shape == sample.shape and full.shape[-1] == 2
  np.testing.assert_allclose(out, full[..., :1], atol=1e-4, rtol=1e-5)


def test_discrete_schedule_matches_the_alphas_cumprod_of_diffusers_schedulers():
  ref = np.load(os.path.join(FIXTURES, 'schedules.npz'))
  for beta_schedule in ref.files:
    table = discrete_logsnr_table(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                  beta_start=1e-4, beta_end=0.02)
    assert np.max(np.abs(1 / (1 + np.exp(-table)) - ref[beta_schedule])) < 1e-6, beta_schedule


def test_guidance_scale_is_one_plus_w():
  cond, uncond, scale = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 3.0]]), 3.5
  np.testing.assert_allclose(
      guided_prediction(cond=cond, uncond=uncond, guidance_w=guidance_w_from_scale(scale)),
      uncond + scale * (cond - uncond), rtol=1e-6)


@pytest.mark.parametrize('teacher', sorted(TEACHERS))
def test_guided_ddim_matches_diffusers_ddim_scheduler(teacher):
  """The imported teacher (one network with a null class, or two networks), sampled by the repo's
  DDIM on the scheduler's own schedule, against diffusers' DDIMScheduler (trailing timesteps) with
  the same noise and guidance_scale = 1 + w; unclipped, and with clip_sample +
  use_clipped_model_output = the repo's clip_x."""
  config = _config(teacher)
  record = records.make(config, stage='teacher')
  model, abstract = records.build(record)
  params = diffusers_import.load_params(config.model, abstract)
  ref = np.load(os.path.join(FIXTURES, teacher, 'ddim.npz'))
  denoise_fn = make_denoise_fn(model, parametrization=record['parametrization'], kind='guided',
                               num_classes=NUM_CLASSES)
  z_init, label = jnp.asarray(ref['z_init'].transpose(0, 2, 3, 1)), jnp.asarray(ref['labels'])
  guidance_w = jnp.full(label.shape, float(ref['guidance_w']))
  for clip in (False, True):
    sampler = make_sampler('ddim', clip_x(denoise_fn) if clip else denoise_fn,
                           num_steps=int(ref['num_steps']), logsnr_fn=schedule_of(config.diffusion))
    x = np.asarray(sampler(params, z_init, label, guidance_w,
                           jax.random.key(0))).transpose(0, 3, 1, 2)
    want = ref[f'clip_{clip}']
    assert np.max(np.abs(x - want)) <= 1e-4 * max(1.0, np.max(np.abs(want))), (teacher, clip)


def test_the_folder_fills_the_config():
  config = _config('teacher_pair')
  assert config.diffusion.schedule == 'discrete' and config.diffusion.parametrization == 'eps'
  assert config.diffusion.beta_schedule == config.model.beta_schedule == 'scaled_linear'
  assert (config.model.unet['num_class_embeds'] == NUM_CLASSES and
          config.model.uncond_unet['num_class_embeds'] is None)
  assert len(config.model.weights_sha256) == len(config.model.uncond_weights_sha256) == 64
  table = discrete_logsnr_table(**{
      k: config.diffusion[k]
      for k in ('num_train_timesteps', 'beta_schedule', 'beta_start', 'beta_end')})
  assert config.diffusion.logsnr_min == pytest.approx(table[-1], abs=1e-5)
  assert _config('teacher_null_class').diffusion.parametrization == 'v'


def _edited_folder(tmp_path, source: str, *, config=None, scheduler=None, weights=True):
  """A copy of a fixture folder with config.json / scheduler_config.json entries replaced."""
  folder = tmp_path / 'teacher'
  shutil.copytree(os.path.join(FIXTURES, source), folder)
  for name, changes in (('config.json', config), ('scheduler_config.json', scheduler)):
    if changes:
      content = json.loads((folder / name).read_text())
      (folder / name).write_text(json.dumps(dict(content, **changes)))
  if not weights:
    (folder / diffusers_import.WEIGHTS_FILE).rename(folder / 'diffusion_pytorch_model.bin')
  return str(folder)


@pytest.mark.parametrize('config_changes,scheduler_changes,weights,message', [
    ({'down_block_types': ['AttnSkipDownBlock2D', 'DownBlock2D'],
      'class_embed_type': 'timestep'}, None, True,
     "UNet2DModel options not supported by models/diffusers_unet.py: class_embed_type 'timestep', "
     'down block AttnSkipDownBlock2D'),
    ({'time_embedding_type': 'fourier'}, None, True,
     "time_embedding_type 'fourier' is score-SDE's"),
    ({'num_class_embeds': 10}, None, True,
     'a one-network guided teacher needs num_classes + 1 = 11'),
    ({'sample_size': 16}, None, True, 'the teacher takes 1-channel 16x16 images'),
    (None, {'rescale_betas_zero_snr': True}, True, 'options not supported: rescale_betas_zero_snr'),
    (None, {'prediction_type': 'flow'}, True, "prediction_type 'flow'"),
    (None, None, False, 'has no diffusion_pytorch_model.safetensors (found '
     'diffusion_pytorch_model.bin: save it with save_pretrained(safe_serialization=True))'),
])
def test_unsupported_teachers_are_refused_in_one_line(tmp_path, config_changes, scheduler_changes,
                                                      weights, message):
  config = diffusers_teacher.get_config()
  config.model.folder = _edited_folder(tmp_path, 'teacher_tiny', config=config_changes,
                                       scheduler=scheduler_changes, weights=weights)
  with pytest.raises(ConfigError) as err:
    prepare_config(config)
  assert message in str(err.value) and '\n' not in str(err.value)


def test_an_override_that_disagrees_with_the_folder_is_refused():
  config = diffusers_teacher.get_config()
  config.model.folder = os.path.join(FIXTURES, 'teacher_tiny')
  config.diffusion.parametrization = 'eps'  # the folder's prediction_type is v_prediction
  with pytest.raises(ConfigError,
                     match="parametrization='eps' disagrees with the teacher folder \\('v'\\)"):
    prepare_config(config)


def test_two_network_student_starts_as_the_conditional_network_and_the_pair_guides(tmp_path):
  """Stage 1 from a two-network teacher: the student is its conditional network plus a zero
  w-embedding."""
  config = _config('teacher_pair', tmp_path)
  teacher_record = records.make(config, stage='teacher')
  teacher, abstract = records.build(teacher_record)
  teacher_params = diffusers_import.load_params(config.model, abstract)
  job = stages.stage1_job(config, teacher_params=teacher_params)
  assert (diffusers_import.UNCOND_KEY not in job.params and
          job.record['model']['uncond_unet'] is None)
  # provenance kept
  assert job.record['model']['uncond_weights_sha256'] == config.model.uncond_weights_sha256
  student, _ = records.build(job.record)
  z_t, logsnr_t = (
      jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), jnp.array([-3.0, 0.0, 2.0, 6.0]))
  label = jnp.array([0, 4, 9, 2])
  student_out = _apply(student, job.params, jnp.concatenate([z_t, z_t]), jnp.tile(logsnr_t, 2),
                       jnp.tile(label, 2), jnp.array([0.0] * 4 + [3.0] * 4),
                       train=False)  # w = 0, then w = 3
  cond, uncond = _apply(teacher, teacher_params, z_t, logsnr_t, label, method='guided_outputs')
  # At w = 0 and at w = 3 alike: the w-embedding starts at zero.
  np.testing.assert_allclose(student_out, jnp.concatenate([cond, cond]), rtol=1e-5, atol=1e-5)
  null = _apply(teacher, teacher_params, z_t, logsnr_t, jnp.full((4,), NUM_CLASSES), train=False)
  # the null label selects the unconditional network
  np.testing.assert_allclose(null, uncond, rtol=1e-5, atol=1e-5)


def test_imported_teacher_to_stage1_to_one_round_to_samples(tmp_path):
  """A diffusers folder -> --mode=teacher (import) -> stage 1 -> one stage-2 round -> --mode=sample
  and --mode=fid, and one encoder round, offline."""
  config = _config('teacher_tiny', tmp_path / 'run')
  for section in (config.stage1, config.stage2):
    section.update(batch_size=8, num_steps=2, warmup_steps=1, log_every=2, checkpoint_every=2)
  config.stage2.update(start_steps=4, final_steps=2)
  config.encoder.update(batch_size=8, num_steps=2, warmup_steps=1, log_every=2, checkpoint_every=2,
                        start_steps=4, final_steps=2)
  teacher_dir = stages.train_teacher(config)
  assert checkpoint.latest_step(teacher_dir) == 0 and records.check_complete(teacher_dir) == 0
  assert stages.train_teacher(config) == teacher_dir  # a second import finds it there
  stages.train_stage1(config)
  round_dir = stages.train_stage2_round(config, 2)
  record = records.read(round_dir)
  assert record['model']['folder'] == config.model.folder
  assert record['model']['weights_sha256'] == diffusers_import.weights_sha256(
      os.path.join(config.model.folder, diffusers_import.WEIGHTS_FILE))
  assert (record['teacher']['dir'] == 'stage1' and
          records.read(stages.stage_dir(config.workdir, 'stage1'))['teacher']['dir'] == 'teacher')
  (encoder_dir,) = stages.train_encoder(config)  # the guided DDIM encoder, distilled from stage 1
  assert records.read(encoder_dir)['model']['weights_sha256'] == record['model']['weights_sha256']
  teacher = LoadedCheckpoint(teacher_dir)
  assert teacher.nfe_per_step == 2 and teacher.record['parametrization'] == 'v'
  config.sample.update(checkpoint=round_dir, num_steps=2, per_class=1, guidance_scale=2.0,
                       out_dir=str(tmp_path / 'samples'))
  png = run_sample(config)
  assert os.path.basename(png) == 'student_ddim_2steps_w1.png'  # guidance_scale 2 is w = 1
  samples = np.load(str(tmp_path / 'samples' / 'student_ddim_2steps_w1.npz'))['samples']
  assert samples.shape == (NUM_CLASSES, 8, 8, 1) and np.all(np.isfinite(samples))
  config.eval.update(classifier_steps=20, num_samples=40, batch_size=40, guidance_ws=(1.0,),
                     teacher_steps=(4,), teacher_ddpm_steps=(), stage1_steps=(), student_steps=(2,),
                     out_dir=str(tmp_path / 'eval'))
  with open(os.path.join(fid.run_fid(config), 'results.csv')) as f:
    rows = {(row['method'], row['steps']): row for row in csv.DictReader(f)}
  # the imported teacher and its 2-step student
  assert set(rows) == {('teacher CFG', '4'), ('student', '2')}
  assert float(rows[('teacher CFG', '4')]['fidelity']) == 0.0
  assert (all(np.isfinite(float(row['fid'])) for row in rows.values()) and
          float(rows[('student', '2')]['fidelity']) > 0)


def test_another_teachers_weights_in_the_same_workdir_are_refused(tmp_path):
  config = _config('teacher_tiny', tmp_path / 'run')
  stages.train_teacher(config)
  other = diffusers_teacher.get_config()
  other.workdir = config.workdir
  weights = load_file(os.path.join(FIXTURES, 'teacher_tiny', diffusers_import.WEIGHTS_FILE))
  other.model.folder = _edited_folder(tmp_path, 'teacher_tiny')
  save_file({k: v + 1.0 for k, v in weights.items()},
            os.path.join(other.model.folder, diffusers_import.WEIGHTS_FILE))
  prepare_config(other)
  with pytest.raises(checkpoint.CheckpointError, match='was made with model='):
    stages.train_teacher(other)
