"""The diffusion math of docs/math.md: pure functions in log-SNR form, no network inside."""

from diffusion.losses import WEIGHTINGS, loss_weight, weighted_x_loss
from diffusion.parametrization import (PARAMETRIZATIONS, diffusion_forward, expand_like,
                                       predict_eps_from_v, predict_eps_from_x, predict_v,
                                       predict_x_from_eps, predict_x_from_v, x_eps_from_output)
from diffusion.schedules import (BETA_SCHEDULES, DISCRETE_FIELDS, SCHEDULES, alpha_sigma,
                                 discrete_logsnr, discrete_logsnr_table, get_logsnr_schedule,
                                 schedule_of, timestep_of_logsnr)
from diffusion.steps import (DDPM_VARIANCES, ddim_step, ddpm_large_variance, ddpm_posterior,
                             ddpm_small_variance, guided_prediction, guidance_w_from_scale, renoise,
                             stage2_x_target, v_target_between)
