"""The paper-style results table (rows method x sampler, columns steps) and plots from results rows."""

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
    cells[(_as_float(r['w']), f'{r["method"]} {r["sampler"]}', int(r['steps']))][str(r.get('seed', ''))] = r  # CSV rows carry '2', fresh rows 2
  return cells


def _mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cell_stats(by_seed: dict) -> tuple[float, float, float]:
  """(FID mean, FID sd, IS mean) of one cell over its noise seeds."""
  fid_mean, fid_sd = _mean_sd([_as_float(r['fid']) for r in by_seed.values()])
  return fid_mean, fid_sd, float(np.mean([_as_float(r['is_mean']) for r in by_seed.values()]))


def _cell_text(by_seed: dict) -> str:
  """'FID / IS' of one seed, or 'mean ± sd / mean IS' over several."""
  fid_mean, fid_sd, is_mean = _cell_stats(by_seed)
  return f'{fid_mean:.2f} / {is_mean:.2f}' if len(by_seed) == 1 else f'{fid_mean:.2f} ± {fid_sd:.2f} / {is_mean:.2f}'


TEACHER = 'teacher CFG ddim'


def paired_differences(rows: list[dict]) -> list[tuple]:
  """(w, name, steps, teacher steps, mean, standard error, wins, seeds) of FID(method) - FID(teacher CFG DDIM).

  Each distilled row (not the teacher's own) is compared with the teacher's CFG DDIM at the same step count
  and at the teacher's largest step count, seed by seed (same noise and labels), over the seeds both have.
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
      out.append((w, name, steps, reference, float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))),
                  int(np.sum(diffs < 0)), len(diffs)))
  return out


def write_table(rows: list[dict], path: str, *, title: str) -> None:
  """One Markdown table per w: cells 'FID / IS', rows 'method sampler', columns step counts.

  With several noise seeds a cell is 'mean ± sd / IS' over them, and a section of paired differences against
  the teacher (paired_differences) follows.
  """
  lines = [f'# Results: {title}', '', 'Cells: FID / IS (lower FID is better; with several noise seeds: mean ± '
           'standard deviation over them). NFE = network calls per sample: the CFG teacher makes 2 per step, a '
           'student 1.', '']
  cells = _cells(rows)
  for w in sorted({key[0] for key in cells}):
    steps = sorted({s for (w2, _, s) in cells if w2 == w})
    grid = collections.defaultdict(dict)
    for (w2, name, s), by_seed in cells.items():
      if w2 == w:
        grid[name][s] = _cell_text(by_seed)
    nfe_per_step = {f'{r["method"]} {r["sampler"]}': int(r['nfe']) // int(r['steps']) for r in rows
                    if 'nfe' in r and _as_float(r['w']) == w}
    lines += [f'## w = {w:g}', '', '| method | NFE per step | ' + ' | '.join(f'{s} steps' for s in steps) + ' |',
              '|---' * (len(steps) + 2) + '|']
    lines += [f'| {name} | {nfe_per_step.get(name, "")} | ' + ' | '.join(cells_.get(s, '') for s in steps) + ' |'
              for name, cells_ in grid.items()]
    lines.append('')
  differences = paired_differences(rows)
  if differences:
    lines += ['## Paired differences against the teacher', '',
              'FID(method) - FID(teacher CFG DDIM) seed by seed (the same noise and labels for both): mean ± standard '
              'error over the seeds; "better" counts the seeds where the method\'s FID is lower.', '',
              '| w | method | steps | teacher steps | FID difference | better |', '|---|---|---|---|---|---|']
    lines += [f'| {w:g} | {name} | {steps} | {ref} | {mean:+.3f} ± {se:.3f} | {wins}/{n} |'
              for w, name, steps, ref, mean, se, wins, n in differences]
    lines.append('')
  files.write_text(path, '\n'.join(lines))


MARKERS = ('o', 's', '^', 'v', 'D', 'P', 'X', '*', '<', '>', 'h', 'p', '8')  # with tab20: no two curves alike


def is_axis(is_values, is_max=None) -> tuple[list, str, str]:
  """(x values, label, scale) of fid_vs_is.png: IS itself, or, where a classifier with is_max classes bounds it
  (the digits: 10), the gap is_max - IS on a log scale, which keeps apart the IS values that all print as 9.9x."""
  if not is_max:
    return list(is_values), 'IS', 'linear'
  return [max(is_max - v, 1e-4) for v in is_values], f'{is_max:g} - IS (log scale; IS grows to the right)', 'log'


def write_plots(rows: list[dict], out_dir: str, *, is_max=None) -> None:
  """fid_vs_steps.png (one panel per w) and fid_vs_is.png (each method's curve over w; see is_axis)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  means = {key: _cell_stats(by_seed) for key, by_seed in _cells(rows).items()}  # (w, name, steps) -> stats
  ws = sorted({key[0] for key in means})
  fig, axes = plt.subplots(1, len(ws), figsize=(4 * len(ws), 3.5), squeeze=False)
  for ax, w in zip(axes[0], ws):
    curves = collections.defaultdict(list)
    for (w2, name, steps), (fid, fid_sd, _) in means.items():
      if w2 == w:
        curves[name].append((steps, fid, fid_sd))
    for name, points in sorted(curves.items()):
      points.sort()
      ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker='o',
                  capsize=2, label=name)  # error bars: sd over noise seeds (none with one seed)
    ax.set(xscale='log', yscale='log', xlabel='sampling steps', ylabel='FID', title=f'w = {w:g}')
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  _save_figure(fig, files.join(out_dir, 'fid_vs_steps.png'))
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 4))
  curves = collections.defaultdict(list)
  for (w, name, steps), (fid, _, is_mean) in means.items():
    curves[f'{name} {steps}'].append((w, is_mean, fid))
  colours = plt.get_cmap('tab20').colors
  _, xlabel, xscale = is_axis([], is_max)
  for i, (name, points) in enumerate(sorted(curves.items())):
    points.sort()
    ax.plot(is_axis([p[1] for p in points], is_max)[0], [p[2] for p in points], marker=MARKERS[i % len(MARKERS)],
            color=colours[i % len(colours)], label=name)
  ax.set(xlabel=xlabel, xscale=xscale, ylabel='FID', yscale='log', title='FID vs IS over w (points: increasing w)')
  if is_max:
    ax.invert_xaxis()
  ax.legend(fontsize=6)
  fig.tight_layout()
  _save_figure(fig, files.join(out_dir, 'fid_vs_is.png'))
  plt.close(fig)


def _save_figure(fig, path: str) -> None:
  """A matplotlib figure as a PNG at 100 dpi, written atomically (local or remote path)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  files.write_bytes(path, buffer.getvalue())
