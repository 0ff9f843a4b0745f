"""The paper-style results table (rows method x sampler, columns steps) and plots from results rows."""

import collections
import io

from train import files


def _as_float(value):
  return float(value) if value not in ('', None) else float('nan')


def write_table(rows: list[dict], path: str, *, title: str) -> None:
  """One Markdown table per w: cells 'FID / IS', rows 'method sampler', columns step counts."""
  lines = [f'# Results: {title}', '', 'Cells: FID / IS (lower FID is better). NFE = network calls per sample: '
           'the CFG teacher makes 2 per step, a student 1.', '']
  by_w = collections.defaultdict(list)
  for row in rows:
    by_w[_as_float(row['w'])].append(row)
  for w in sorted(by_w):
    steps = sorted({int(r['steps']) for r in by_w[w]})
    grid = collections.defaultdict(dict)
    for r in by_w[w]:
      grid[f'{r["method"]} {r["sampler"]}'][int(r['steps'])] = f'{_as_float(r["fid"]):.2f} / {_as_float(r["is_mean"]):.2f}'
    nfe_per_step = {f'{r["method"]} {r["sampler"]}': int(r['nfe']) // int(r['steps']) for r in by_w[w] if 'nfe' in r}
    lines += [f'## w = {w:g}', '', '| method | NFE per step | ' + ' | '.join(f'{s} steps' for s in steps) + ' |',
              '|---' * (len(steps) + 2) + '|']
    lines += [f'| {name} | {nfe_per_step.get(name, "")} | ' + ' | '.join(cells.get(s, '') for s in steps) + ' |'
              for name, cells in grid.items()]
    lines.append('')
  files.write_text(path, '\n'.join(lines))


MARKERS = ('o', 's', '^', 'v', 'D', 'P', 'X', '*', '<', '>', 'h', 'p', '8')  # with tab20: no two curves alike


def write_plots(rows: list[dict], out_dir: str) -> None:
  """fid_vs_steps.png (one panel per w) and fid_vs_is.png (each method's curve over w)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ws = sorted({_as_float(r['w']) for r in rows})
  fig, axes = plt.subplots(1, len(ws), figsize=(4 * len(ws), 3.5), squeeze=False)
  for ax, w in zip(axes[0], ws):
    curves = collections.defaultdict(list)
    for r in rows:
      if _as_float(r['w']) == w:
        curves[f'{r["method"]} {r["sampler"]}'].append((int(r['steps']), _as_float(r['fid'])))
    for name, points in sorted(curves.items()):
      points.sort()
      ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=name)
    ax.set(xscale='log', yscale='log', xlabel='sampling steps', ylabel='FID', title=f'w = {w:g}')
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  _save_figure(fig, files.join(out_dir, 'fid_vs_steps.png'))
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 4))
  curves = collections.defaultdict(list)
  for r in rows:
    curves[f'{r["method"]} {r["sampler"]} {r["steps"]}'].append(
        (_as_float(r['w']), _as_float(r['is_mean']), _as_float(r['fid'])))
  colours = plt.get_cmap('tab20').colors
  for i, (name, points) in enumerate(sorted(curves.items())):
    points.sort()
    ax.plot([p[1] for p in points], [p[2] for p in points], marker=MARKERS[i % len(MARKERS)],
            color=colours[i % len(colours)], label=name)
  ax.set(xlabel='IS', ylabel='FID', yscale='log', title='FID vs IS over w (points: increasing w)')
  ax.legend(fontsize=6)
  fig.tight_layout()
  _save_figure(fig, files.join(out_dir, 'fid_vs_is.png'))
  plt.close(fig)


def _save_figure(fig, path: str) -> None:
  """A matplotlib figure as a PNG at 100 dpi, written atomically (local or remote path)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  files.write_bytes(path, buffer.getvalue())
