"""notebooks/demo.ipynb runs top to bottom on the tiny config (no install), shows its plots inline,
opens a finished run instead of training, and is stored with the outputs of a run
(notebooks/render.py)."""

import os
import subprocess
import sys

import nbclient
import nbformat
import pytest
from jupyter_client import kernelspec

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'demo.ipynb')


def _ensure_python3_kernel(tmp_path, monkeypatch) -> None:
  """Makes a python3 kernel spec findable: Jupyter's own, or this interpreter's installed into
  tmp_path (the test never skips for want of a kernel)."""
  try:
    kernelspec.KernelSpecManager().get_kernel_spec('python3')
    return
  except kernelspec.NoSuchKernel:
    pass
  prefix = tmp_path / 'jupyter'
  subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--prefix', str(prefix)],
                 check=True, capture_output=True)
  monkeypatch.setenv('JUPYTER_PATH', str(prefix / 'share' / 'jupyter'))


def _outputs(nb, mime: str) -> list:
  return [
      o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
      if mime in o.get('data', {})
  ]


def test_demo_notebook_runs_on_the_tiny_config(tmp_path, monkeypatch):
  _ensure_python3_kernel(tmp_path, monkeypatch)
  workdir = tmp_path / 'demo'
  monkeypatch.setenv('DEMO_SKIP_INSTALL', '1')
  monkeypatch.setenv('DEMO_CONFIG', 'tiny')
  monkeypatch.setenv('DEMO_WORKDIR', str(workdir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': REPO}}).execute()
  assert (workdir / 'results' / 'summary.md').stat().st_size > 0
  assert (workdir / 'teacher').is_dir() and (workdir / 'stage2' / 'steps_0001').is_dir()
  for name in ('results.csv', 'results.md', 'fid_vs_nfe.png'):
    # the small FID of the tiny config is its own protocol
    assert (workdir / 'eval' / name).stat().st_size > 0
  assert len(_outputs(nb, 'image/png')) == 2  # the sample grid and fid_vs_nfe.png
  assert len(_outputs(nb, 'text/markdown')) == 1  # the FID table
  # The pipeline is finished now: a notebook started on it opens it as it is; elsewhere it trains.
  for finished_run, says in ((workdir, 'a finished run, opened as it is'),
                             (tmp_path / 'none', 'trained here')):
    env = dict(os.environ, DEMO_CONFIG='tiny', DEMO_FINISHED_RUN=str(finished_run))
    env.pop('DEMO_WORKDIR')
    result = subprocess.run([sys.executable, '-c', '\n'.join(_code_cells()[:2])], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and says in result.stdout, result.stderr[-2000:]


def _code_cells() -> list[str]:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return [cell.source for cell in nb.cells if cell.cell_type == 'code']


def test_the_notebook_is_stored_with_the_outputs_of_a_run():
  """So it reads where the repository is browsed: every code cell ran (`python
  notebooks/render.py`), the sample grid and the FID plot are there, and the outputs stay small."""
  from notebooks import render  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
  assert not [o for cell in code for o in cell.outputs if o.output_type == 'error']
  assert len(_outputs(nb, 'image/png')) == 2 and len(_outputs(nb, 'text/markdown')) == 1
  assert 0 < render.output_bytes(nb) < render.MAX_BYTES


def _setup_cell() -> str:
  return _code_cells()[0]


def test_setup_cell_clones_the_repository_from_elsewhere_and_finds_it_again_after_a_restart(
    tmp_path):
  """Colab: the first cell runs in a directory that is not the repository, clones it, and a
  restarted runtime (a new process, no clone address given) finds the clone and imports the code
  from it."""
  check = ('\nimport configs.tiny\nprint("cwd", os.getcwd())\nprint("config", '
           'configs.tiny.__file__)\n')
  clone, elsewhere = tmp_path / 'clone', tmp_path / 'content'
  elsewhere.mkdir()
  env = dict(os.environ, DEMO_REPO_DIR=str(clone), DEMO_SKIP_INSTALL='1', PYTHONPATH='')
  # first run: clone from this repository; after a restart: nothing to clone from
  for repo_url in (REPO, ''):
    result = subprocess.run(
        [sys.executable, '-c', _setup_cell() + check], cwd=elsewhere, capture_output=True,
        text=True, env=dict(env, DEMO_REPO_URL=repo_url), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'cwd {clone}' in result.stdout and f'config {clone}' in result.stdout, result.stdout
  result = subprocess.run(
      [sys.executable, '-c', _setup_cell()], cwd=elsewhere, capture_output=True, text=True,
      env=dict(env, DEMO_REPO_DIR=str(tmp_path / 'none'), DEMO_REPO_URL=''), timeout=300)
  assert result.returncode != 0 and 'repository not found: set REPO_URL' in result.stderr
