"""The per-stage fidelity rows of modes/stage_quality.py as summary.md tables and a
fidelity-against-w plot."""

import io
from typing import Optional

import numpy as np

from eval.images import TITLE_KEY
from train import files


def _format(value, spec: str = '.4g') -> str:
  if value is None:
    return '-'
  return value if isinstance(value, str) else format(value, spec)


def _model(row: dict) -> str:
  """A row's model as the tables name it: 'stage 1 ddim 32', 'student ddim 4 (stage 2: 8 -> 4)'."""
  if row['stage'].startswith('teacher_'):
    return f'{row["student"]} ({row["role"]})'
  return row['student'] if row['stage'] == 'stage1' else f'{row["student"]} ({row["title"]})'


def _legend(config) -> list[str]:
  p, ev = config.pipeline, config.eval
  return [
      'Every model the pipeline trained and the guided teacher\'s own samplers, sampled from the '
      f'same noise and labels ({p.quality_samples} class-balanced samples per w, `{ev.extractor}` '
      'features). Columns:',
      '',
      '- **to the teacher** (the headline): Frechet distance between the model\'s samples and '
      f'the reference\'s, the guided teacher\'s CFG DDIM at {p.quality_steps} steps (NFE '
      f'{2 * p.quality_steps}), on the same noise. 0 is the teacher itself; lower is better. A '
      'distilled model should reproduce its teacher at every w.',
      '- **verdict**: `faithful` when no further from the reference than the floor, the same '
      f'teacher\'s CFG DDIM at {p.floor_steps} steps (NFE {2 * p.floor_steps}); `drifted` '
      'otherwise (e.g. more or less guided than the teacher).',
      '- **to its own teacher**: the same distance to the model it was distilled from (stage 1: '
      'the reference; a round: the previous round\'s student, or stage 1); **paired RMS**: the '
      'root-mean-square pixel difference to that model\'s samples from the same noise.',
      '- **precision / recall**: the fraction of samples inside the real data\'s '
      'k-nearest-neighbour manifold (quality), and of real examples inside the samples\' '
      '(coverage), k = 3 (Kynkaanniemi et al. 2019). A student that leaks guidance into small w '
      'loses recall against its teacher\'s row.',
      '- **class acc.**: the fraction of samples the extractor\'s classifier assigns to the label '
      'they were drawn for (`-` where its logits are not the data\'s own classes, as '
      'with Inception).',
      '- **FID**: against the real data. At w >= 1 less guidance scores a lower FID, so a '
      'student with a lower FID than its teacher is not a better distillation: read '
      'fidelity first.',
  ]


def _sweep_table(rows: list[dict], ws: list[float]) -> list[str]:
  """Rows: the floor, stage 1 and every DDIM student; columns: w; cells: fidelity (and the drifted
  mark)."""
  models = []
  for row in rows:
    if row['stage'] != 'teacher_reference' and _model(row) not in models:
      models.append(_model(row))
  lines = ['| model (NFE) | ' + ' | '.join(f'w = {w:g}' for w in ws) + ' |',
           '|---' * (len(ws) + 1) + '|']
  for model in models:
    by_w = {r['w']: r for r in rows if _model(r) == model}
    nfe = next(iter(by_w.values()))['student_nfe']
    cells = [
        _format(by_w[w]['fidelity']) +
        (' drifted' if by_w[w].get('verdict') == 'drifted' else '') if w in by_w else '' for w in ws
    ]
    lines.append(f'| {model} (NFE {nfe}) | ' + ' | '.join(cells) + ' |')
  return lines


def summary_lines(rows: list[dict], *, config) -> list[str]:
  """'## Fidelity to the teacher, stage by stage': a table across w, then one table per w."""
  ws = sorted({row['w'] for row in rows})
  lines = ['## Fidelity to the teacher, stage by stage', '', *_legend(config), '',
           '### Distance to the teacher across w', '',
           'Cells: distance to the teacher (the headline column below); `drifted` marks a '
           'verdict that failed.',
           '', *_sweep_table(rows, ws)]
  for w in ws:
    lines += [
        '', f'### w = {w:g}', '',
        '| model | NFE | to the teacher | verdict | to its own teacher | paired RMS | '
        'precision | recall | class acc. | FID |', '|---|---|---|---|---|---|---|---|---|---|']
    for row in (r for r in rows if r['w'] == w):
      lines.append(f'| {_model(row)} | {row["student_nfe"]} | {_format(row["fidelity"])} '
                   f'| {_format(row.get("verdict"))} | {_format(row.get("stage_fidelity"))} '
                   f'| {_format(row.get("paired_rms"))} | {_format(row["precision"], ".3f")} '
                   f'| {_format(row["recall"], ".3f")} | {_format(row["accuracy"], ".3f")} '
                   f'| {_format(row["fid"])} |')
      if row.get('stochastic'):
        lines.append(f'| {row["stochastic"]} ({row["title"]}) | {row["stochastic"].split()[-1]} '
                     f'| {_format(row["stochastic_fidelity"])} | - | - | - | - | - | - | - |')
  return lines


def plot_fidelity_vs_w(rows: list[dict], path: str) -> Optional[np.ndarray]:
  """fidelity_vs_w.png: distance to the teacher against w for the floor, stage 1 and the DDIM
  students.

  Returns the image [H, W, 3] (for TensorBoard), or None when there is nothing to plot.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  models = {}
  for row in rows:
    if row['stage'] != 'teacher_reference' and row['fidelity'] is not None and row['fidelity'] > 0:
      models.setdefault(_model(row), []).append((row['w'], row['fidelity']))
  if not models:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for model, points in models.items():
    ws, values = zip(*sorted(points))
    floor = model.endswith('(floor)')
    ax.plot(ws, values, 'k--' if floor else 'o-', label=model, linewidth=2 if floor else 1,
            markersize=3)
  ax.set_yscale('log')
  ax.set_xlabel('guidance weight w')
  ax.set_ylabel('distance to the teacher (Frechet, lower is better)')
  title = 'Fidelity to the guided teacher across w (dashed: the teacher\'s own floor)'
  ax.set_title(title)
  ax.legend(fontsize=7, loc='best')
  ax.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  buffer = io.BytesIO()
  # as every picture of a run
  fig.savefig(buffer, format='png', dpi=110, metadata={TITLE_KEY: title})
  plt.close(fig)
  files.write_bytes(path, buffer.getvalue())
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))
