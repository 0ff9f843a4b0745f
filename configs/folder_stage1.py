"""Stage 1 on your own folder of images (see folder_teacher.py for the data and the recipe).

  python main.py --config=configs/folder_stage1.py --mode=distill --config.data.path=DIR
"""

from configs import folder_teacher


def get_config():
  config = folder_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
