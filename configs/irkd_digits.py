r"""IRKD's table (configs/irkd_cifar10.py) as a short offline run on digits.

  python main.py --config=configs/irkd_digits.py --workdir=workdirs/irkd_digits

The same rows, recipe structure and curriculum (12, 16, 20, 24, 28, 32 px crops of the padded
32-px image, optimizer re-created per stage, each stage validated on the hold-out at its
resolution (resized, as P4) with early stopping after 3 epochs and its best weights restored,
constant AdamW, KD T 4, attention saliency 0.8), scaled to a CPU: scikit-learn's digits at 32 px
(1,294 train / 143 held out / 360 test), a `demo` ViT teacher (patch 4) trained here first,
`micro` IRKD students (patch 4), 30 epochs (5 per stage); dropout as the notebooks' P4 models
(students hidden 0.1; teacher hidden and attention 0.1). About ten minutes on 2 cores; the README
compares its table with the paper's. Runs go to <workdir>/<run>.

Departs from the released code (``): none  # IRKD's rows scaled down to digits: no released counterpart
"""
from configs import common, demo, irkd_cifar10

EPOCHS = 30
VAL_SIZE = 143  # a 10% hold-out (IRKD: 5k of 50k) for the curriculum rows' stage validation
STAGE_EPOCHS = EPOCHS // len(irkd_cifar10.RESOLUTIONS)


def _digits(c):
  """The demo's digits settings (configs/demo.py) at IRKD's 32 px with 4 px crop padding."""
  c.data = common.ConfigDict(dict(c.data))
  label_smoothing = c.label_smoothing
  demo.digits_settings(c)
  c.data.image_size = 32
  c.data.crop_padding = 4
  c.data.val_size = VAL_SIZE  # the same hold-out for the teacher and every row
  c.data.val_seed = 42
  c.data.val_split_method = 'torch'
  c.data.num_workers = 0
  c.label_smoothing = label_smoothing  # the recipe's own (none for IRKD)
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 220


def teacher_config():
  c = common.base()
  _digits(c)
  c.name = 'teacher'
  c.model = common.ConfigDict(
      dict(name='vit', variant='demo', patch_size=4, drop_path=0.0, dropout=0.1, attn_dropout=0.1,
           mean=common.DIGITS_MEAN, std=common.DIGITS_STD))
  c.distill.method = 'none'
  c.schedule.lr = 3e-3
  c.schedule.warmup_epochs = 2.0
  c.num_epochs = float(EPOCHS)
  return c


def row_config(row: str):
  c = irkd_cifar10.get_config(f'{row},p4')
  with c.unlocked():
    _digits(c)
    c.name = row
    c.model = common.ConfigDict(  # the row's model kind: irkd_vit (kd rows) or vit (ce, cl)
        dict(name=c.model.name, variant='micro', patch_size=4, drop_path=0.0,
             dropout=c.model.dropout, attn_dropout=c.model.attn_dropout, mean=common.DIGITS_MEAN,
             std=common.DIGITS_STD))
    c.teacher = common.ConfigDict(
        dict(name='vit', variant='demo', patch_size=4, checkpoint='{workdir}/teacher',
             mean=common.DIGITS_MEAN, std=common.DIGITS_STD))
    c.schedule.lr = 1e-3  # constant, as the paper's recipe; higher for the tiny model and budget
    c.num_epochs = float(EPOCHS)
    if c.curriculum.stages:
      c.curriculum.stages = [(r, STAGE_EPOCHS) for r in irkd_cifar10.RESOLUTIONS]
  return c


def get_config(arg: str = ''):
  rows = tuple(arg.split(',')) if arg else irkd_cifar10.ROWS
  unknown = set(rows) - set(irkd_cifar10.ROWS)
  if unknown:
    raise ValueError(f'irkd_digits takes rows from {",".join(irkd_cifar10.ROWS)}, got {arg!r}')
  c = common.ConfigDict()
  c.summary_title = 'IRKD rows on digits: test accuracy (360 images)'
  c.runs = common.ConfigDict()
  c.runs.teacher = teacher_config()
  for row in rows:
    c.runs[row] = row_config(row)
  c.run_order = ('teacher',) + rows
  c.lock()
  return c
