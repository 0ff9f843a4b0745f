"""The paper-style results table (rows method x sampler, columns steps) and plots from results
rows."""

import collections
import io

import numpy as np

from train import files


def _as_float(value):
  return float(value) if value not in ('', None) else float('nan')


def _cells(rows: list[dict]) -> dict:
  """{(w, 'method sampler', steps): {seed: row}}: the rows of one cell, one per noise seed."""
  cells = collections.defaultdict(dict)
  for r in rows:
    key = (_as_float(r['w']), f'{r["method"]} {r["sampler"]}', int(r['steps']))
    cells[key][str(r.get('seed', ''))] = r  # CSV rows carry '2', fresh rows 2
  return cells


def _mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cell_stats(by_seed: dict) -> tuple[float, float, float]:
  """(FID mean, FID sd, IS mean) of one cell over its noise seeds."""
  fid_mean, fid_sd = _mean_sd([_as_float(r['fid']) for r in by_seed.values()])
  return fid_mean, fid_sd, float(np.mean([_as_float(r['is_mean']) for r in by_seed.values()]))


def _mean_of(by_seed: dict, name: str) -> float:
  """The mean of one column over a cell's seeds; nan where its rows have none."""
  return float(np.mean([_as_float(r.get(name)) for r in by_seed.values()]))


def _cell_text(by_seed: dict) -> str:
  """'FID / IS' of one seed, or 'mean ± sd / mean IS' over several; ' / precision / recall' and
  ' / accuracy' appended where the rows have them (means over the seeds)."""
  fid_mean, fid_sd, is_mean = _cell_stats(by_seed)
  text = (f'{fid_mean:.2f} / {is_mean:.2f}'
          if len(by_seed) == 1 else f'{fid_mean:.2f} ± {fid_sd:.2f} / {is_mean:.2f}')
  for names in (('precision', 'recall'), ('accuracy',)):
    values = [_mean_of(by_seed, name) for name in names]
    if not np.isnan(values[0]):
      text += ''.join(f' / {v:.3f}' for v in values)
  return text


def steps_text(n: int) -> str:
  """A step count in words: '1 step', '4 steps' (table headers, titles, labels)."""
  return f'{n} step{"s" * (n != 1)}'


def what_better_means(w: float) -> str:
  """What a lower FID against the real data says at guidance weight w."""
  if w == 0:
    return (
        'w = 0 is the conditional model without guidance: its samples should match the real '
        'data, so a lower FID is better.')
  if w < 1:
    return (
        f'w = {w:g} is light guidance: it may still bring the samples closer to the data '
        'than w = 0, but a method can also score a lower FID by following the guidance less; '
        'compare with the teacher\'s row.')
  return (
      f'w = {w:g}: guidance trades diversity for class fidelity, so every method\'s samples '
      'move away from the real data by design and FID against the data grows with w. A lower FID '
      'than the teacher\'s here means less guidance effect, not better distillation: a student is '
      'good when it matches the teacher CFG row at this w (the pipeline\'s summary.md compares '
      'each student with its teacher directly).')


def _legend(rows: list[dict], *, is_max) -> list[str]:
  """The lines that explain the table once: cells, rows, columns, IS cap, accuracy, NFE."""
  def has(name):
    return any(not np.isnan(_as_float(r.get(name))) for r in rows)

  has_accuracy, has_recall = has('accuracy'), has('precision')
  cell = ('FID / IS' + (' / precision / recall' if has_recall else '') +
          (' / accuracy' if has_accuracy else ''))
  lines = [
      f'Each cell is {cell} of one method\'s samples at one step count and guidance weight w, '
      'scored against the real data; with several noise seeds, FID is the mean ± standard '
      'deviation over them.',
      '',
      '- **FID**: Fréchet distance between the features of the samples and of the real data (the '
      'reference split). What a lower FID means depends on w: see the line under each w.',
      '- **IS**: Inception Score, exp(E KL(p(y|x) || p(y))): high when each sample is classified '
      'confidently and the classes are balanced.' + (
          f' With these features it is at most {is_max:g}, the classifier\'s class '
          f'count, so values near {is_max:g} say little: FID and accuracy tell methods '
          'apart there.' if is_max else ''),
  ]
  if has_recall:
    lines.append(
        '- **precision** / **recall**: the fraction of samples inside the real data\'s k-NN '
        'manifold / of real examples inside the samples\' (k = 3, Kynkäänniemi et al. 2019): '
        'quality and coverage, which FID folds into one number.')
  if has_accuracy:
    lines.append(
        '- **accuracy** (results.csv: `accuracy`): the fraction of samples the classifier '
        'assigns to the class they were drawn for (class fidelity; guidance raises it).')
  lines += [
      '- **method**: the model and its sampler. "teacher CFG" is the guided teacher '
      '(classifier-free guidance, 2 network calls a step); "student ddim" at N steps is the N-step '
      'student of stage 2, "student stochastic" at 2N steps the same N-step student with the '
      'stochastic sampler; "stage 1" is the w-conditioned student before halving; "direct PD CFG" '
      'the direct baseline; "teacher CFG clipped" the teacher with each step\'s x prediction '
      'clipped to [-1, 1]; "student fixed-w" a student distilled at that one w (the '
      'paper\'s baseline).',
      '- **NFE per step**: network calls per sampling step; NFE per sample = steps x NFE per '
      'step, the cost `fid_vs_nfe.png` compares methods at.',
      '- **N steps** columns: sampling steps.', '']
  return lines


TEACHER = 'teacher CFG ddim'


def paired_differences(rows: list[dict]) -> list[tuple]:
  """(w, name, steps, teacher steps, mean, standard error, wins, seeds) of FID(method) - FID(teacher
  CFG DDIM).

  Each distilled row (not the teacher's own) is compared with the teacher's CFG DDIM at the same
  step count and at the teacher's largest step count, seed by seed (same noise and labels), over the
  seeds both have.
  """
  cells, out = _cells(rows), []
  for (w, name, steps), by_seed in sorted(cells.items()):
    teacher_steps = sorted(s for (w2, n2, s) in cells if w2 == w and n2 == TEACHER)
    if name == TEACHER or not teacher_steps:
      continue
    for reference in sorted({steps, teacher_steps[-1]} & set(teacher_steps)):
      teacher = cells[(w, TEACHER, reference)]
      seeds = sorted(set(by_seed) & set(teacher))
      if len(seeds) < 2:
        continue
      diffs = np.array([_as_float(by_seed[k]['fid']) - _as_float(teacher[k]['fid']) for k in seeds])
      out.append(
          (w, name, steps, reference, float(diffs.mean()),
           float(diffs.std(ddof=1) / np.sqrt(len(diffs))), int(np.sum(diffs < 0)), len(diffs)))
  return out


def _fidelity_text(by_seed: dict) -> str:
  """The fidelity of one cell (mean over its seeds); '' for a row scored without it."""
  value = _mean_of(by_seed, 'fidelity')
  return '' if np.isnan(value) else (
      f'{value:.3f}' if value >= 0.001 or value == 0 else f'{value:.1e}')


def _fidelity_section(rows: list[dict]) -> list[str]:
  """'## Fidelity to the teacher': per w, each method's Frechet distance to the teacher's reference
  samples (same noise and labels); [] when no row has a fidelity."""
  cells = _cells(rows)
  texts = {key: _fidelity_text(by_seed) for key, by_seed in cells.items()}
  if not any(texts.values()):
    return []
  lines = [
      '## Fidelity to the teacher', '',
      'Each cell is the **fidelity**: the Fréchet distance between the method\'s samples and '
      'the teacher\'s reference samples (its CFG DDIM at the most steps, 0 in its own row) drawn '
      'from the same noise and labels at the same w: lower is closer to the teacher at every w. '
      'Precision and recall against the real data are in the FID cells below.', '']
  for w in sorted({key[0] for key in texts}):
    steps = sorted({s for (w2, _, s), text in texts.items() if w2 == w and text})
    grid = collections.defaultdict(dict)
    for (w2, name, s), text in texts.items():
      if w2 == w and text:
        grid[name][s] = text
    lines += [f'### w = {w:g}', '', '| method | ' + ' | '.join(steps_text(s) for s in steps) + ' |',
              '|---' * (len(steps) + 1) + '|']
    lines += [f'| {name} | ' + ' | '.join(by_steps.get(s, '') for s in steps) + ' |'
              for name, by_steps in grid.items()]
    lines.append('')
  return lines


def write_table(rows: list[dict], path: str, *, title: str, is_max=None) -> None:
  """results.md: first the fidelity to the teacher (_fidelity_section), the headline; then one table
  per w against the real data: cells 'FID / IS [/ precision / recall] [/ accuracy]', rows 'method
  sampler', columns step counts, each column explained once on top of them, and under each w what a
  lower FID means there (what_better_means); then the paired differences against the teacher
  (paired_differences).

  With several noise seeds a cell is 'mean ± sd / IS' over them. is_max: the classifier's class
  count that bounds IS (None: Inception).
  """
  fidelity = _fidelity_section(rows)
  lines = [f'# Results: {title}', '']
  if fidelity:
    lines += [
        'The first section is the headline: how closely each method reproduces its '
        'teacher, on the same noise and labels. The tables after it score each method against the '
        'real data, where at w >= 1 a lower FID is not a better distillation.', '', *fidelity
    ]
  lines += ['## FID / IS against the real data', '', *_legend(rows, is_max=is_max)]
  cells = _cells(rows)
  for w in sorted({key[0] for key in cells}):
    steps = sorted({s for (w2, _, s) in cells if w2 == w})
    grid = collections.defaultdict(dict)
    for (w2, name, s), by_seed in cells.items():
      if w2 == w:
        grid[name][s] = _cell_text(by_seed)
    nfe_per_step = {f'{r["method"]} {r["sampler"]}': int(r['nfe']) // int(r['steps']) for r in rows
                    if 'nfe' in r and _as_float(r['w']) == w}
    lines += [f'### w = {w:g}', '', what_better_means(w), '',
              '| method | NFE per step | ' + ' | '.join(steps_text(s) for s in steps) + ' |',
              '|---' * (len(steps) + 2) + '|']
    lines += [f'| {name} | {nfe_per_step.get(name, "")} | ' +
              ' | '.join(cells_.get(s, '') for s in steps) + ' |'
              for name, cells_ in grid.items()]
    lines.append('')
  differences = paired_differences(rows)
  if differences:
    lines += [
        '## Paired differences against the teacher', '',
        'FID(method) - FID(teacher CFG DDIM) seed by seed (the same noise and labels for both): '
        'mean ± standard error over the seeds; "lower FID" counts the seeds where the method\'s '
        'FID is lower (at w >= 1 that is not "better": see the line under each w heading).', '',
        '| w | method | steps | teacher steps | FID difference | lower FID |',
        '|---|---|---|---|---|---|']
    lines += [f'| {w:g} | {name} | {steps} | {ref} | {mean:+.3f} ± {se:.3f} | {wins}/{n} |'
              for w, name, steps, ref, mean, se, wins, n in differences]
    lines.append('')
  files.write_text(path, '\n'.join(lines))


# with tab20: no two curves alike
MARKERS = ('o', 's', '^', 'v', 'D', 'P', 'X', '*', '<', '>', 'h', 'p', '8')


def is_axis(is_values, is_max=None) -> tuple[list, str, str]:
  """(x values, label, scale) of fid_vs_is.png: IS itself, or, where a classifier with is_max
  classes bounds it (the digits: 10), the gap is_max - IS on a log scale, which keeps apart the IS
  values that all print as 9.9x."""
  if not is_max:
    return list(is_values), 'IS', 'linear'
  return ([max(is_max - v, 1e-4) for v in is_values],
          f'{is_max:g} - IS (log scale; IS grows to the right)', 'log')


def write_plots(rows: list[dict], out_dir: str, *, is_max=None) -> None:
  """fid_vs_steps.png and fid_vs_nfe.png (one panel per w: FID against sampling steps, and against
  network calls per sample, the cost the paper compares at) and fid_vs_is.png (each method's curve
  over w; see is_axis)."""
  plt = _pyplot()
  for x_name in ('steps', 'nfe'):
    fig = fid_panels_figure(rows, x_name=x_name)
    _save_figure(fig, files.join(out_dir, f'fid_vs_{x_name}.png'))
    plt.close(fig)
  fig = fid_vs_is_figure(rows, is_max=is_max)
  _save_figure(fig, files.join(out_dir, 'fid_vs_is.png'))
  plt.close(fig)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _means(rows: list[dict]) -> dict:
  """{(w, 'method sampler', steps): (FID mean, FID sd, IS mean, NFE)} over each cell's seeds."""
  return {key: (*_cell_stats(by_seed), int(next(iter(by_seed.values())).get('nfe') or 0))
          for key, by_seed in _cells(rows).items()}


def _plain_log_ticks(ax, which: str) -> None:
  """Labels a log axis ('x' or 'y') of ax at 1, 2, 5 x 10^k as plain numbers (or, over less than
  that, at three points), minor ticks unlabelled: readable over any range, where matplotlib labels
  every minor tick of a range under a decade and they overlap. Call after plotting (it reads the
  axis limits)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  low, high = sorted(ax.get_xlim() if which == 'x' else ax.get_ylim())
  ticks = [m * 10.0 ** k for k in range(
      int(np.floor(np.log10(low))),
      int(np.ceil(np.log10(high))) + 1) for m in (1, 2, 5) if low <= m * 10.0 ** k <= high]
  if len(ticks) < 2:
    ticks = [float(f'{v:.3g}') for v in np.geomspace(low, high, 5)[1:-1]]
  axis = ax.xaxis if which == 'x' else ax.yaxis
  axis.set_major_locator(ticker.FixedLocator(ticks))
  axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f'{value:g}'))
  axis.set_minor_formatter(ticker.NullFormatter())


def fid_panels_figure(rows: list[dict], *, x_name: str):
  """One panel per w: FID (± sd over seeds) of each method against x_name, 'steps' or 'nfe'."""
  plt, means = _pyplot(), _means(rows)
  xlabel = {'steps': 'sampling steps', 'nfe': 'network calls per sample (NFE)'}[x_name]
  ws = sorted({key[0] for key in means})
  fig, axes = plt.subplots(1, len(ws), figsize=(4 * len(ws) + 1, 4), squeeze=False)
  for ax, w in zip(axes[0], ws):
    curves = collections.defaultdict(list)
    for (w2, name, steps), (fid, fid_sd, _, nfe) in means.items():
      if w2 == w:
        curves[name].append((steps if x_name == 'steps' else nfe, fid, fid_sd))
    for name, points in sorted(curves.items()):
      points.sort()
      ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                  marker='o', capsize=2,
                  label=name)  # error bars: sd over noise seeds (none with one seed)
    ax.set(
        xscale='log', yscale='log', xlabel=xlabel, ylabel='FID against the real data',
        title=f'w = {w:g}' + (' (lower: closer to the data)' if w == 0 else
                              ' (lower is not better: results.md)' if w >= 1 else ''))
    ax.title.set_fontsize(9)
    _plain_log_ticks(ax, 'x')
    _plain_log_ticks(ax, 'y')
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f'FID against {xlabel}', fontsize=10)
  fig.tight_layout()
  return fig


def fid_vs_is_figure(rows: list[dict], *, is_max):
  """Each method (and step count) as a curve joining its points at the run's w, in increasing w."""
  plt, means = _pyplot(), _means(rows)
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  curves = collections.defaultdict(list)
  for (w, name, steps), (fid, _, is_mean, _) in means.items():
    curves[f'{name} {steps_text(steps)}'].append((w, is_mean, fid))
  colours = plt.get_cmap('tab20').colors
  _, xlabel, xscale = is_axis([], is_max)
  for i, (name, points) in enumerate(sorted(curves.items())):
    points.sort()
    ax.plot(is_axis([p[1] for p in points], is_max)[0], [p[2] for p in points],
            marker=MARKERS[i % len(MARKERS)], color=colours[i % len(colours)], label=name)
  ws = sorted({key[0] for key in means})
  over = f' at w = {ws[0]:g}: one point per method' if len(ws) == 1 else \
      (': one curve per method, through its points at w = '
       f'{", ".join(f"{w:g}" for w in ws)} in that order')
  ax.set(xlabel=xlabel, xscale=xscale, ylabel='FID against the real data', yscale='log',
         title=f'FID vs IS{over}')
  ax.title.set_fontsize(9)
  if is_max:
    ax.invert_xaxis()
  if xscale == 'log':
    _plain_log_ticks(ax, 'x')
  _plain_log_ticks(ax, 'y')
  ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.02, 1.0))
  fig.tight_layout()
  return fig


def _save_figure(fig, path: str) -> None:
  """A matplotlib figure as a PNG at 100 dpi, written atomically (local or remote path)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  files.write_bytes(path, buffer.getvalue())
