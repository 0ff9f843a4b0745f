"""A diffusers UNet2DModel teacher you already have, distilled by this repo (docs/import.md); no
PyTorch needed.

  python main.py --config=configs/diffusers_teacher.py --config.model.folder=DIR --mode=pipeline \
      --config.workdir=runs/imported  # import, stage 1, stage 2, the fidelity table, samples
  python main.py --config=configs/diffusers_teacher.py --config.model.folder=COND_DIR \
      --config.model.uncond_folder=UNCOND_DIR --mode=pipeline \
      --config.workdir=runs/imported_pair  # two networks
  python main.py --config=configs/diffusers_teacher.py:cifar10 \
      --config.model.folder=DIR ...  # CIFAR-10's recipe

DIR holds config.json and diffusion_pytorch_model.safetensors (what save_pretrained writes), and the
scheduler it was trained with (scheduler_config.json there, in ../scheduler/, or DIR is a pipeline
with unet/ and scheduler/). --mode=teacher imports it into WORKDIR/teacher; every other mode then
runs as with a teacher trained here. The recipe (digits by default, or cifar10 / imagenet64) gives
the data, the stages' optimizer settings and the evaluation; its own model and noise schedule are
replaced by the folder's. The fields left empty below are filled from the folder(s) by
modes.validation.prepare_config (main.py runs it after the overrides): the architecture, the sha256
of the weights (kept in the students' records), the scheduler's beta schedule (the 'discrete'
log-SNR schedule of diffusion/schedules.py: samplers at N steps visit the timesteps T i / N - 1) and
its prediction_type (epsilon / v_prediction / sample -> parametrization eps / v / x). Guidance
weights are this paper's w everywhere: diffusers' guidance_scale is 1 + w.
"""

import importlib

import ml_collections

RECIPES = ('digits', 'cifar10', 'imagenet64')


def get_config(recipe: str = 'digits'):
  if recipe not in RECIPES:
    raise ValueError(
        f"unknown recipe '{recipe}' for configs/diffusers_teacher.py; choose one of: "
        f"{', '.join(RECIPES)}")
  config = importlib.import_module(f'configs.{recipe}_teacher').get_config()
  config.workdir = f'runs/imported_{recipe}'
  # per-block gains from w need this repo's U-Net, not UNet2DModel
  config.distill.guidance_gains = False
  # one reference per field: never shared
  empty_dict = lambda: ml_collections.config_dict.placeholder(dict)
  # filled from the folder
  discrete = dict(num_train_timesteps=0, beta_schedule='', beta_start=0.0, beta_end=0.0)
  # dropout: -1 keeps config.json's (the students take distill.dropout).
  config.model = ml_collections.ConfigDict(dict(name='diffusers_unet', folder='', uncond_folder='',
                                                dtype='float32', dropout=-1.0, unet=empty_dict(),
                                                uncond_unet=empty_dict(), weights_sha256='',
                                                uncond_weights_sha256='', **discrete))
  # logsnr_min is set to the last timestep's log-SNR; logsnr_max is t = 0 (clean data), above
  # timestep 0's.
  config.diffusion = ml_collections.ConfigDict(
      dict(schedule='discrete', logsnr_min=-20.0, logsnr_max=20.0, parametrization='',
           loss_weighting='truncated_snr', **discrete))
  return config
