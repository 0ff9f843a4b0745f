"""Executes notebooks/demo.ipynb top to bottom and stores it with its outputs, so it reads without
running.

  python notebooks/render.py  # the 2-D toy config (seconds per stage): the stored outputs
  python notebooks/render.py --config=digits
      # the digits: opens runs/digits when the Quickstart finished it,
      # else trains into runs/demo_digits (minutes)

Runs with the installed (pinned) stack in this interpreter's python3 kernel, from the repository
root, and refuses a working tree with uncommitted changes outside the notebook, so the stored
outputs are those of a commit (the setup cell prints it). Fails, storing nothing, if a cell fails or
the outputs exceed MAX_BYTES.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import nbclient
import nbformat
from jupyter_client import kernelspec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'demo.ipynb')
MAX_BYTES = 300_000  # stored outputs: the sample grid, one plot and a table


def python3_kernel_env(prefix: str) -> dict:
  """The environment under which a python3 kernel spec is found: Jupyter's own, or this
  interpreter's installed under prefix."""
  try:
    kernelspec.KernelSpecManager().get_kernel_spec('python3')
    return {}
  except kernelspec.NoSuchKernel:
    subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--prefix', prefix], check=True,
                   capture_output=True)
    return {'JUPYTER_PATH': os.path.join(prefix, 'share', 'jupyter')}


def uncommitted_changes() -> list[str]:
  """`git status --porcelain` lines of the repository, except the notebook's own."""
  status = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True,
                          text=True, check=True)
  return [line for line in status.stdout.splitlines() if not line.endswith('notebooks/demo.ipynb')]


def output_bytes(nb) -> int:
  """Characters of every stored output (images as their base64 text), as they weigh in the file."""
  return sum(len(nbformat.writes(nbformat.v4.new_notebook(cells=[cell]))) - len(cell.source)
             for cell in nb.cells if cell.cell_type == 'code')


def render(config_name: str, *, allow_dirty: bool = False) -> int:
  """Executes the notebook with DEMO_CONFIG=config_name and writes it back with its outputs; returns
  their size."""
  changes = uncommitted_changes()
  if changes and not allow_dirty:
    raise SystemExit(
        'error: uncommitted changes (the stored outputs would be of no commit); commit '
        'first, or pass --allow_dirty:\n' + '\n'.join(changes))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with tempfile.TemporaryDirectory() as prefix:
    os.environ.update(python3_kernel_env(prefix), DEMO_CONFIG=config_name, DEMO_SKIP_INSTALL='1')
    client = nbclient.NotebookClient(nb, timeout=3600, kernel_name='python3', record_timing=False,
                                     resources={'metadata': {'path': REPO}})
    client.execute()
  size = output_bytes(nb)
  if size > MAX_BYTES:
    raise SystemExit(
        f'error: the outputs take {size:,} bytes, over {MAX_BYTES:,}: make the figures smaller')
  nb.metadata.pop('widgets', None)
  nbformat.write(nb, NOTEBOOK)
  return size


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', choices=('tiny', 'digits'), default='tiny')
  parser.add_argument('--allow_dirty', action='store_true',
                      help='render although the tree has uncommitted changes')
  args = parser.parse_args()
  size = render(args.config, allow_dirty=args.allow_dirty)
  print(f'{NOTEBOOK}: stored with its outputs ({size:,} bytes of outputs, config {args.config})')


if __name__ == '__main__':
  main()
