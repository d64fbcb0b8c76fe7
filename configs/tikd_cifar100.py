r"""TIKD ViT students on CIFAR-100 with a ResNet32x4 teacher, DeiT's recipe (README "TIKD").

  python main.py --config=configs/tikd_cifar100.py:large --workdir=workdirs/tikd_large \
      --config.data.dir=/path/to/cifar --config.teacher.checkpoint=workdirs/resnet32x4

Argument: `small|medium|large` (1.09M / 4.17M / 16.35M with text modules), then optionally, comma
separated: a distillation method (none|soft|hard|kd|dkd|ctkd|pkcd; hard KD is the paper's
headline, the default), e.g. `configs/tikd_cifar100.py:medium,dkd`; `notext` for the vision-only
DeiT student (no stages, no text features needed); `released` for the released code's recipe
(README "The released recipe"). Reported top-1: 65.20 / 75.70 / 80.42.
Stages: a vision-only KD warm-up (50 epochs), then joint text-image training (250 epochs).

`released` (JSJ515-Group/TIKD main.py, losses.py, models.py), e.g. `large,hard,released`:
  * base loss CE of the class head against the argmax of the mixed target, unsmoothed, and that
    argmax as DKD's / PKCD's label (distill.base='released'); τ 0.2 (its --distillation-tau);
  * per-block value projections `blocks.i.attn.text_proj` (model.text_proj_layout='per_block');
  * text fused in every step from the first (no stages), with rows 0..B−1 of the caption
    features for every batch of B (tikd.text_rows='released') and eval_text='released';
  * no alignment loss (computed but never added there) and no text predictor loss (it has none);
  * its model EMA (timm ModelEma, decay 0.99996 per step), evaluated beside the raw weights
    (metrics `ema_top1`, …; the released code only saves it).
Left for later: its repeated-augmentation sampler. Its README
launch is 4 GPUs × 256 (global batch 1,024, lr 1e-3), each GPU taking rows 0..255; here rows
0..B−1 of the global batch (a one-GPU launch of batch B).
"""
from configs import common

METHODS = ('none', 'soft', 'hard', 'kd', 'dkd', 'ctkd', 'pkcd')
FLAGS = ('notext', 'released')


def _parse(arg: str) -> tuple[str, str, set[str]]:
  size, *rest = arg.split(',')
  methods = [a for a in rest if a in METHODS]
  flags = {a for a in rest if a in FLAGS}
  unknown = [a for a in rest if a and a not in METHODS + FLAGS]
  if size not in ('small', 'medium', 'large') or unknown or len(methods) > 1 or flags == set(FLAGS):
    raise ValueError(f'tikd_cifar100 takes small|medium|large[,method][,notext|,released] '
                     f'(method one of {"|".join(METHODS)}), got {arg!r}')
  return size, (methods or ['hard'])[0], flags


def get_config(arg: str = 'large'):
  size, method, flags = _parse(arg)
  c = common.base()
  c.name = f'tikd_{size}' + ('_released' if 'released' in flags else '')
  c.data.name = 'cifar100'
  c.data.num_workers = -1
  c.model.variant = size
  c.model.drop_path = 0.1
  c.distill.method = method
  c.distill.temperature = 1.0 if c.distill.method == 'soft' else 4.0  # DeiT's tau for soft
  # DeiT recipe: AdamW lr 5e-4 × batch/512, wd 0.05, 300 epochs, 5 warm-up epochs, smoothing 0.1.
  c.batch_size = 256
  c.schedule.lr = 5e-4 * c.batch_size / 512
  c.num_epochs = 300.0
  common.deit_augment(c)
  if 'released' in flags:
    released_recipe(c)
  elif 'notext' not in flags:
    common.tikd_stages(c, warmup_epochs=50, joint_epochs=250)
  c.log_every_steps = 100
  c.lock()
  return c


def released_recipe(c: common.ConfigDict) -> None:
  """The released TIKD code's training (module docstring), on the DeiT recipe above."""
  c.distill.base = 'released'
  c.distill.temperature = 0.2  # released main.py --distillation-tau default, for every method
  c.model.text_proj_layout = 'per_block'
  c.tikd.fuse_text = True  # one phase: the released model fuses in every forward
  c.tikd.text_rows = 'released'
  c.tikd.eval_text = 'released'
  # Its eval batch is 1.5 × the train batch (main.py data_loader_val); with text rows 0..b-1
  # per eval batch of b, this decides which test image meets which caption row.
  c.eval_batch_size = int(1.5 * c.batch_size)
  c.tikd.alignment_beta = 0.0
  c.tikd.text_predictor_weight = 0.0
  c.ema.decay = 0.99996  # main.py --model-ema (on by default), --model-ema-decay
