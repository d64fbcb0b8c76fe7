r"""TIKD's text fusion on IRKD's resolution curriculum, in one run (beyond both papers).

  python main.py --config=configs/tikd_irkd_cifar10.py --workdir=workdirs/tikd_irkd \
      --config.data.dir=/path/to/cifar --config.teacher.checkpoint=workdirs/vit_teacher_p4 \
      --config.text.features_dir=text/c10-train

IRKD's `kd_cl` row (configs/irkd_cifar10.py): CIFAR-10 45k/5k (seed 42), the ViT-Tiny student,
the p4 ViT teacher (configs/vit_teacher_cifar10.py), 0.5·CE + 0.5·KD at T 4, AdamW 3e-4 wd 1e-4
constant, batch 128, hidden dropout 0.1, crops of 12, 16, 20, 24, 28, 32 px × 10 epochs with the
optimizer re-created per stage, each stage validated on the 5k hold-out at its resolution
(resized; a fusing stage on its fused pass with predicted text) with early stopping after 3
epochs and its best weights restored (the digits variant has no hold-out and no validation).
The curriculum is written as `config.stages`, each stage with a `resolution`, so that
TIKD's switches ride on it: from `fuse_from` px on the stages fuse text (TIKD's joint
text-image training: the fused second pass, alignment 0.1, text predictor 1.0); before, they are
vision-only and train neither text term. Test is at 32 px, caption-free (the text predictor's
guess, `top1`) with the first pass alone beside it (`top1_no_text`).

`--config.text.features_dir=DIR` is required: caption features of the 45k training images (the
train split with the 5k validation images held out, so give the text teacher the same
`--data.val_size 5000 --data.val_seed 42 --data.val_split_method torch`), from
`python -m tikd_jax.text_teacher caption` + `encode` (README "The text teacher"); a run that
fuses text stops with a message without them.
Without a captioner, `--config.text.class_prompt_encoder=minilm` (or a CLIP folder) writes
class-prompt features into DIR first.

Arguments, comma-separated, all optional:
  sal           + IRKD's attention saliency alignment at 0.8 (their `kd_cl_sal` row).
  fuse_from=R   the first fusing resolution (default 16, the second stage; 0: never fuse).
  digits        a CPU-sized run (tests/test_tikd_irkd.py): scikit-learn digits at 16 px, the
                curriculum halved to 8, 12, 16 px (fusing from 12) in `resize` mode (an 8-px
                digit is the 8×8 original; an 8-px crop of one is a few strokes), a `demo`
                student (the `micro` one stays near chance for ~300 steps), lr 1e-3 (as
                configs/irkd_digits.py), the resnet8 teacher of configs/tiny.py:teacher,
                class-prompt features from the bundled MiniLM encoder, 2 epochs per stage:
    python main.py --config=configs/tiny.py:teacher --workdir=/tmp/teacher --config.num_epochs=2
    python main.py --config=configs/tikd_irkd_cifar10.py:digits --workdir=/tmp/tikd_irkd \
        --config.teacher.checkpoint=/tmp/teacher --config.text.features_dir=/tmp/tikd_irkd_text
  epochs=E      epochs per stage (default 10; digits 2).

Student: `irkd_vit`, IRKD's own (dist token zero-initialised without a position embedding, no
final norm, cls head at eval). It is the same `DistilledViT` class as TIKD's students, so the
trainer builds its text modules (`text_dim` from the features) like theirs; without a final
norm the fusion weighs and re-runs the raw last-block tokens (the cosine does not care about
their scale). `distilled_vit` (the DeiT / TIKD layout) would change IRKD's student, not only
add text.

Departs from the released code (``): none  # TIKD on IRKD's curriculum is beyond both papers: no released counterpart
"""
from configs import common, irkd_cifar10

RESOLUTIONS = irkd_cifar10.RESOLUTIONS
# Digits at 16 px (configs/tiny.py): the curriculum halved and kept on the 4-px patch grid.
DIGITS_RESOLUTIONS = (8, 12, 16)
# TIKD fuses after a vision-only warm-up of 50 of its 300 epochs, one sixth; IRKD's first stage
# is that sixth of its 6 × 10 epochs. At 12 px a crop is a 3×3-patch window of the padded image
# and matches the whole-image caption worst; from 16 px on fusion trains for 50 of 60 epochs,
# the share of TIKD's joint stage (250 of 300). Digits: from their second stage too.
FUSE_FROM_STAGE = 1

ARGS = common.Args(
    'tikd_irkd_cifar10', flags=('sal', 'digits'),
    options=dict(fuse_from=common.number(int, None, 0, 'R'),
                 epochs=common.number(float, None, 0, 'E')))


def _parse(arg: str) -> dict:
  opts = ARGS.parse(arg)
  resolutions = DIGITS_RESOLUTIONS if opts['digits'] else RESOLUTIONS
  if opts['fuse_from'] is None:
    opts['fuse_from'] = resolutions[FUSE_FROM_STAGE]
  if opts['fuse_from'] not in resolutions + (0,):
    raise ARGS.error(
        arg, f'fuse_from={opts["fuse_from"]} is none of the curriculum resolutions '
        f'{resolutions} (or 0: never fuse)')
  if opts['sal'] and opts['digits']:
    raise ARGS.error(arg, 'sal needs a ViT teacher; the digits variant has a resnet8 one')
  return opts


def curriculum_stages(resolutions, stage_epochs: float, fuse_from: int) -> list[dict]:
  """IRKD's resolutions as TIKD stages: vision-only below `fuse_from` px, joint from it on.
  Vision-only stages train no text term: the text predictor only serves the fused pass."""
  stages = []
  for r in resolutions:
    fuse = bool(fuse_from) and r >= fuse_from
    stages.append(
        dict(name=f'res{r}_joint' if fuse else f'res{r}_vision', epochs=stage_epochs, resolution=r,
             reset_optimizer=True, fuse_text=fuse, text_predictor_weight=1.0 if fuse else 0.0))
  return stages


def _digits(c) -> None:
  """16-px digits (configs/tiny.py), a `demo` student and tiny.py's resnet8 teacher."""
  c.name = 'tikd_irkd_digits'
  c.data.name = 'digits'
  c.data.image_size = 16
  c.data.crop_padding = 2
  c.data.flip = False  # a flipped digit is another digit, or none
  c.data.val_size = 0
  c.data.num_workers = 0
  c.curriculum.mode = 'resize'
  c.curriculum.val_transform = ''  # no hold-out here: no per-stage validation
  norm = dict(mean=common.DIGITS_MEAN, std=common.DIGITS_STD)
  c.model = common.ConfigDict(
      dict(name='irkd_vit', variant='demo', img_size=16, patch_size=4, drop_path=0.0, **norm))
  c.teacher = common.ConfigDict(dict(name='resnet8', checkpoint='', **norm))
  c.text.class_prompt_encoder = 'minilm'
  c.text.class_prompt_template = 'a photo of the digit {name}.'
  c.schedule.lr = 1e-3  # configs/irkd_digits.py's: higher for the small model and budget
  c.batch_size = 32
  c.eval_batch_size = 120
  c.log_every_steps = 15
  c.checkpoint_every_steps = 0
  c.xla_options = 'fast_compile'  # the tiny steps compile for longer than they run


def get_config(arg: str = ''):
  opts = _parse(arg)
  c = irkd_cifar10.get_config('kd_cl_sal,p4' if opts['sal'] else 'kd_cl,p4')
  with c.unlocked():
    c.name = 'tikd_irkd' + ('_sal' if opts['sal'] else '')
    resolutions = RESOLUTIONS
    stage_epochs = opts['epochs'] or 10.0
    if opts['digits']:
      _digits(c)
      resolutions, stage_epochs = DIGITS_RESOLUTIONS, opts['epochs'] or 2.0
      c.eval_every_epochs = stage_epochs
    c.curriculum.stages = []  # the same resolutions, as stages that also carry TIKD's switches
    c.stages = curriculum_stages(resolutions, stage_epochs, opts['fuse_from'])
    c.num_epochs = stage_epochs * len(resolutions)
  return c
