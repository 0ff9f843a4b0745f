"""A newcomer's first commands (docs/first_steps.md): one error line for a command that cannot
start, titled pictures, a warning outside a student's w range, no library banners, result files that
explain themselves."""

import logging as pylogging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from eval import report
from eval.images import TITLE_KEY, samples_image, save_png, title_height
from modes import pipeline
from modes.methods import list_methods
from modes.sampling import LoadedCheckpoint, run_sample
from distill import stages

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
CONFIG_FILES = {  # name -> text of a config file that gives no config
    'no_get_config.py': 'x = 1\n',
    'syntax.py': 'def get_config(:\n',
    'imports.py': 'import no_such_module_here\n\ndef get_config():\n  return None\n',
    'returns_none.py': 'def get_config():\n  return None\n',
    'raises.py': 'def get_config():\n  raise ValueError("boom")\n',
    'notes.md': '# Notes\n',
}


def _main(*args, cwd, env=None, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


@pytest.mark.parametrize('args, message', [
    ([], '--config is required: give a config file, e.g. --config=configs/digits_teacher.py'),
    (['--mode=sample'], '--config is required'),
    (['--config.workdir=elsewhere'], '--config is required'),
    (['--config=nope.py', '--mode=teacher'], 'no config file nope.py: give one of configs/*.py'),
    (['--config=nope.py', '--config.workdir=elsewhere'], 'no config file nope.py'),
    (['--config={configs}'], 'no config file'),  # a directory
    (['--config={configs}/notes.md'],
     'notes.md is not a config file (a Python file): give one of configs/*.py'),
    (['--config={configs}/no_get_config.py'], 'no_get_config.py defines no get_config()'),
    (['--config={configs}/syntax.py'], 'syntax.py does not parse: line 1'),
    (['--config={configs}/imports.py'],
     "fails to load: ModuleNotFoundError: No module named 'no_such_module_here'"),
    (['--config={configs}/returns_none.py'], 'returned NoneType, not an ml_collections.ConfigDict'),
    (['--config={configs}/raises.py', '--mode=sample'], 'raised ValueError: boom'),
    (['--mode=train', f'--config={TINY}'],
     'unknown --mode=train: did you mean --mode=pipeline or --mode=teacher?'),
    (['--mode=distil'], 'unknown --mode=distil: did you mean --mode=distill?'),
    # the classifier has no mode of its own: the modes that score samples train it
    (['--mode=classifier', f'--config={TINY}'],
     'unknown --mode=classifier: did you mean --mode=fid?'),
    (['--mode', 'smaple', f'--config={TINY}'],
     'unknown --mode=smaple: did you mean --mode=sample?'),
])
def test_a_command_that_cannot_start_ends_in_one_error_line_and_writes_nothing(
    tmp_path, args, message):
  configs, cwd = tmp_path / 'configs', tmp_path / 'cwd'
  configs.mkdir()
  cwd.mkdir()
  for name, text in CONFIG_FILES.items():
    (configs / name).write_text(text)
  result = _main(*(arg.format(configs=configs) for arg in args), cwd=cwd)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = _error_lines(result.stderr)
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert os.listdir(cwd) == []


def test_a_missing_tfds_data_set_stops_before_anything_is_written(tmp_path):
  result = _main('--config=configs/cifar10_teacher.py', '--mode=teacher',
                 f'--config.workdir={tmp_path / "run"}',
                 f'--config.data.tfds_data_dir={tmp_path / "tfds"}', cwd=REPO)
  assert result.returncode == 1
  # nothing else
  assert result.stderr.strip().splitlines() == _error_lines(result.stderr), result.stderr[-2000:]
  assert "dataset 'cifar10' is not prepared in" in _error_lines(result.stderr)[0]
  assert os.listdir(tmp_path) == []  # no config.json, logs/, jax_cache/ nor a tfds folder


def test_a_stage_folder_given_as_checkpoint_lists_its_rounds(toy_run, tmp_path):
  stage2 = os.path.join(toy_run.workdir, 'stage2')
  for checkpoint, message in (
      (stage2, f'{stage2} holds one checkpoint per round, not one checkpoint'),
      (os.path.join(stage2, 'steps_4'), f'no checkpoint in {stage2}/steps_4: the rounds')):
    result = _main(f'--config={TINY}', '--mode=sample', f'--config.workdir={tmp_path / "run"}',
                   f'--config.sample.checkpoint={checkpoint}', cwd=REPO)
    assert result.returncode == 1
    errors = _error_lines(result.stderr)
    assert (len(errors) == 1 and message in errors[0] and
            'steps_0008, steps_0004' in errors[0]), result.stderr[-2000:]
    assert not (tmp_path / 'run').exists()


def test_a_student_sampled_outside_its_w_range_warns_once_and_samples(toy_run, tmp_path):
  student = stages.stage_dir(toy_run.workdir, 'stage2', 4)
  result = _main(f'--config={TINY}', '--mode=sample', f'--config.workdir={tmp_path / "run"}',
                 f'--config.sample.checkpoint={student}', '--config.sample.guidance_w=8',
                 f'--config.sample.out_dir={tmp_path / "out"}', cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  warnings = [line for line in result.stderr.splitlines() if 'lies outside' in line]
  assert warnings == [line for line in result.stderr.splitlines() if line.startswith('W')
                     ], result.stderr[-2000:]
  assert (len(warnings) == 1 and
          f'{student} was distilled for w in [0, 4]; w=8 lies outside' in warnings[0])
  assert (tmp_path / 'out' / 'student_ddim_4steps_w8.png').exists()
  assert LoadedCheckpoint(student).trained_w_range() == (0.0, 4.0)
  # any w
  assert LoadedCheckpoint(stages.stage_dir(toy_run.workdir, 'teacher')).trained_w_range() is None


def _has_title(path: str, title: str) -> bool:
  """Whether a PNG stores `title` as its Title text and shows ink in the band on top where
  with_title draws it."""
  image = Image.open(path)
  band = np.asarray(image.convert('L'))[:title_height()]
  return image.text.get(TITLE_KEY) == title and (band < 128).sum() > 50


def test_every_picture_of_the_pipeline_and_sample_mode_carries_its_title(toy_run, tmp_path):
  config = toy_run.copy_and_resolve_references()
  config.pipeline.update(guidance_ws=(0.0, 2.0), teacher_steps=(4,))
  config.sample.update(out_dir=str(tmp_path / 'samples'),
                       checkpoint=stages.stage_dir(toy_run.workdir, 'stage2', 8),
                       sampler='stochastic', num_steps=16, guidance_w=2.0)
  results = pipeline.run_pipeline(config)
  methods = list_methods(config, teacher_steps=(4,))
  assert {'teacher CFG', 'student 8-step', 'student 4-step'} <= {m.model for m in methods}
  for method in methods:
    for w in (0.0, 2.0):
      assert _has_title(os.path.join(results, f'{method.file_stem(w)}.png'),
                        method.title(w)), method.title(w)
  for name in os.listdir(results):  # any other test's pictures in this shared run too
    if name.endswith('.png'):
      assert Image.open(os.path.join(results, name)).text.get(TITLE_KEY), name
  png = run_sample(config)
  assert os.path.basename(png) == 'student_stochastic_16steps_w2.png'  # the pipeline's name for it
  assert _has_title(png, 'student 8-step, stochastic 16 steps (NFE 16), w = 2')
  assert os.path.exists(os.path.join(results, 'student_stochastic_16steps_w2.png'))


def test_image_grids_are_titled_and_label_each_row_with_its_class(tmp_path):
  images = np.ones((12, 8, 8, 1), np.float32)  # white: any ink is a label
  labels = np.repeat(np.arange(3), 4)  # class-major, as fixed_inputs gives them
  title = 'student 2-step, stochastic 4 steps (NFE 4), w = 2'
  grid = samples_image(images, labels, num_rows=3, title=title)
  save_png(str(tmp_path / 'g.png'), grid, title=title)
  assert _has_title(str(tmp_path / 'g.png'), title)
  rows = grid[title_height():]
  row_height = (8 + 1) * 8  # images scaled to 64 px, 1 px padding scaled alike
  ink = [(rows[8 + i * row_height:8 + (i + 1) * row_height, :60] < 128).sum() for i in range(3)]
  assert all(n > 20 for n in ink), ink  # 'class 0', 'class 1', 'class 2' beside their rows


def test_the_overview_names_each_student_and_its_classes(tmp_path):
  images = np.ones((3, 8, 8, 1), np.float32)
  rows = [('teacher CFG, ddim 4 steps (NFE 8)', images),
          ('student 2-step, stochastic 4 steps (NFE 4)', images)]
  title = pipeline.overview_title(2.0, 3)
  grid = pipeline.overview_image(rows, np.arange(3), title=title)
  save_png(str(tmp_path / 'o.png'), grid, title=title)
  assert _has_title(str(tmp_path / 'o.png'), title) and 'w = 2' in title
  assert grid.shape[1] > 3 * 36 + 150  # room for the row labels beside three 36-px columns


def _noise(stderr: str) -> list[str]:
  """Library banners and deprecation chatter in stderr: TensorFlow's C++ log lines (oneDNN, CPU
  features), absl's pre-init notice, Python deprecation warnings."""
  patterns = (r'\.cc:\d+\]', r'oneDNN', r'cpu_feature_guard', r'absl::InitializeLog',
              r'[Dd]eprecat', r'FutureWarning')
  return [line for line in stderr.splitlines() if any(re.search(p, line) for p in patterns)]


def test_quickstart_sample_fid_and_dry_run_print_no_library_banner(toy_run, tmp_path):
  """The README's commands through main.py, with TF_CPP_MIN_LOG_LEVEL unset as in a fresh shell: the
  pipeline (on the trained toy run: its stages are done, it samples and writes results),
  --mode=sample, --mode=fid and a dry run."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  config = tmp_path / 'toy_run_config.py'  # the toy run's own config, as a config file
  config.write_text(
      f'import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict('
      f'{toy_run.to_dict()!r})\n')
  commands = {
      'pipeline': ['--mode=pipeline', '--config.pipeline.quality_samples=0',
                   '--config.pipeline.guidance_ws=(1.0,)', '--config.pipeline.teacher_steps=(4,)'],
      'sample': ['--mode=sample', '--config.sample.num_steps=4',
                 f'--config.sample.out_dir={tmp_path / "samples"}'],
      'fid': ['--mode=fid', '--config.eval.num_samples=256', '--config.eval.guidance_ws=(1.0,)',
              '--config.eval.teacher_steps=(4,)', '--config.eval.teacher_ddpm_steps=()',
              '--config.eval.student_steps=(4,)', f'--config.eval.out_dir={tmp_path / "eval"}'],
  }
  for name, args in commands.items():
    result = _main(f'--config={config}', *args, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, (name, result.stderr[-2000:])
    assert _noise(result.stderr) == [], name
  dry = tmp_path / 'dry'
  result = _main(f'--config={TINY}', f'--config.workdir={dry}', '--mode=teacher', '--dry_run',
                 cwd=REPO, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert _noise(result.stderr) == []
  last = result.stderr.strip().splitlines()[-1]
  assert last.endswith(
      '[dry run] every stage of --mode=teacher builds, shards and steps; nothing was written')
  assert str(dry) not in last and not dry.exists()


def test_the_library_noise_filter_drops_tfds_own_deprecation_and_keeps_other_warnings():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  import main  # pylint: disable=g-import-not-at-top
  kept = []
  handler = pylogging.Handler()
  handler.emit = kept.append
  handler.addFilter(main._OwnInfoOnly())  # pylint: disable=protected-access
  logger = logging.get_absl_logger()
  logger.addHandler(handler)
  try:
    for _ in range(2):  # tfds logs it for its first 10 reads only; one of these reads is enough
      _ = tfds.features.TensorInfo(shape=(), dtype=np.int32).dtype
    logging.warning('a real warning: disk almost full')
  finally:
    logger.removeHandler(handler)
  assert [record.getMessage() for record in kept] == ['a real warning: disk almost full']


def test_results_md_explains_every_column_and_what_better_means_at_each_w(tmp_path):
  rows = [dict(method='teacher CFG', sampler='ddim', steps=s, nfe=2 * s, w=w, fid=10.0 + w,
               is_mean=9.9, accuracy=0.97) for s in (1, 8) for w in (0.0, 4.0)]
  report.write_table(rows, str(tmp_path / 'results.md'), title='t', is_max=10)
  text = (tmp_path / 'results.md').read_text(encoding='utf-8')
  assert '| method | NFE per step | 1 step | 8 steps |' in text and '1 steps' not in text
  assert '| teacher CFG ddim | 2 | 10.00 / 9.90 / 0.970 | 10.00 / 9.90 / 0.970 |' in text
  for column in (
      '**FID**', '**IS**', '**accuracy**', '**method**', '**NFE per step**', '**N steps**'):
    assert text.count(column) == 1, column
  assert 'at most 10, the classifier\'s class count' in text
  assert (report.what_better_means(0.0) in text and
          'a lower FID is better' in report.what_better_means(0.0))
  assert (report.what_better_means(4.0) in text and
          'not better distillation' in report.what_better_means(4.0))
  for row in rows:  # scored against the teacher too: that section leads
    row.update(fidelity=0.0 if row['steps'] == 8 else 0.5, precision=0.7, recall=0.8)
  report.write_table(rows, str(tmp_path / 'results.md'), title='t', is_max=10)
  text = (tmp_path / 'results.md').read_text(encoding='utf-8')
  headings = [line for line in text.splitlines() if line.startswith('## ')]
  assert headings == ['## Fidelity to the teacher', '## FID / IS against the real data'], headings
  assert '| teacher CFG ddim | 0.500 | 0.000 |' in text
  # precision and recall sit beside FID and IS, explained once
  assert '| teacher CFG ddim | 2 | 10.00 / 9.90 / 0.700 / 0.800 / 0.970 |' in text
  assert 'Each cell is FID / IS / precision / recall / accuracy' in text
  assert text.count('**precision** / **recall**') == 1


def _overlaps(boxes) -> bool:
  return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_fid_plots_compare_at_equal_network_calls_and_read_after_a_one_w_run(tmp_path):
  rows = [dict(method='teacher CFG', sampler='ddim', steps=s, nfe=2 * s, w=4.0, fid=60.0 + s % 7,
               is_mean=9.99 - s / 1e4) for s in (2, 4, 8, 64)]
  rows += [dict(method='student', sampler='ddim', steps=s, nfe=s, w=4.0, fid=50.0 + s,
                is_mean=9.98 - s / 1e3)
           for s in (1, 2, 4, 8)]
  report.write_plots(rows, str(tmp_path), is_max=10)
  assert {'fid_vs_steps.png', 'fid_vs_nfe.png', 'fid_vs_is.png'} <= set(os.listdir(tmp_path))
  nfe = report.fid_panels_figure(rows, x_name='nfe')
  teacher = next(bars for bars in nfe.axes[0].containers if bars.get_label() == 'teacher CFG ddim')
  assert list(teacher.lines[0].get_xdata()) == [4, 8, 16, 128]  # network calls, not steps
  fig = report.fid_vs_is_figure(rows, is_max=10)
  ax = fig.axes[0]
  assert ax.get_title() == 'FID vs IS at w = 4: one point per method'
  fig.canvas.draw()
  for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
    shown = [t for t in labels if t.get_visible() and t.get_text()]
    assert (len(shown) >= 2 and
            not _overlaps([t.get_window_extent() for t in shown])), [t.get_text() for t in shown]


def test_summary_samples_section_explains_its_columns_with_the_real_data_beside_them(tmp_path):
  config = tiny_config(tmp_path)
  entries = [dict(method='student 1-step, ddim 1 step', nfe=1, w=0.0,
                  file='student_ddim_1steps_w0.png', mean=0.1, std=0.5, saturated=0.0)]
  summary = pipeline._summary  # pylint: disable=protected-access
  text = summary(config, {'teacher': 1.0}, entries, [], has_overview=False)
  assert '| method | NFE | w | mean | std | saturated | grid |' in text and '1 steps' not in text
  # 2-D data: no overview
  assert 'What "better" means depends on w' in text and 'overview_w' not in text
  for column in (
      '**method**', '**NFE**', '**w**', '**mean**', '**std**', '**saturated**', '**grid**'):
    assert text.count(column) == 1, column
  real = next(line for line in text.splitlines() if line.startswith('| real data (toy2d train)'))
  assert float(real.split('|')[5]) > 0.5  # the toy mixture's spread
