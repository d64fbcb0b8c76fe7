r"""The smallest real run: a micro distilled ViT on 16-px digits. For smoke tests and CI.

  python main.py --config=configs/tiny.py --workdir=/tmp/tiny
  python main.py --config=configs/tiny.py:hard --workdir=/tmp/tiny_kd \
      --config.teacher.checkpoint=/tmp/tiny_teacher

Argument: a distillation method (any of `tikd_jax.losses.METHODS`), or `teacher` for a resnet8
teacher trained with cross-entropy.

Departs from the released code (`none`): none  # a smoke-test preset: no released counterpart
"""
from configs import common


def get_config(arg: str = 'none'):
  c = common.base()
  c.name = f'tiny_{arg}'
  c.data.name = 'digits'
  c.data.image_size = 16
  c.data.crop_padding = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 1.0
  c.log_every_steps = 10
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 10
  c.schedule.lr = 3e-3
  c.schedule.warmup_epochs = 0.2
  c.model = common.ConfigDict(
      dict(name='distilled_vit', variant='micro', img_size=16, drop_path=0.1,
           mean=common.DIGITS_MEAN, std=common.DIGITS_STD))
  c.teacher = common.ConfigDict(
      dict(name='resnet8', checkpoint='', mean=common.DIGITS_MEAN, std=common.DIGITS_STD))
  if arg == 'teacher':
    c.model = common.ConfigDict(dict(name='resnet8', mean=common.DIGITS_MEAN,
                                     std=common.DIGITS_STD))
    c.distill.method = 'none'
    c.optimizer.name = 'sgd'
    c.optimizer.weight_decay = 5e-4
    c.schedule.lr = 0.05
  else:
    c.distill.method = arg
  c.lock()
  return c
