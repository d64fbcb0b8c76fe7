r"""CNN distillation baselines on CIFAR-100: ResNet32x4 → ResNet8x4 (mdistiller;
README "Distillation methods").

  python main.py --config=configs/kd_cifar100.py:dkd --workdir=workdirs/kd_dkd \
      --config.data.dir=/path/to/cifar --config.teacher.checkpoint=teachers/resnet32x4

Argument: a distillation method (any of `tikd_jax.losses.METHODS`; kd by default). The RepDistiller / mdistiller recipe (SGD 0.05,
momentum 0.9, wd 5e-4, batch 64, 240 epochs, ×0.1 at 150/180/210) with their loss weights:
  kd    0.1·CE + 0.9·KD(T 4)                     (reported 73.33)
  ctkd  0.1·CE + 0.9·KD(learned T, GRL, λ ramp 10 epochs)
  dkd   1.0·CE + min(epoch/20, 1)·(1·TCKD + 8·NCKD), T 4   (reported 76.32)
  soft / hard   DeiT's (1 − α)·CE + α·distill, α 0.5
  pkcd  CE + KD_soft + InfoNCE + intra-class (as released with TIKD)
  none  CE only (ResNet8x4 alone: 72.50)
The teacher is RepDistiller's resnet32x4_vanilla/ckpt_epoch_240.pth converted with
`python -m convert.from_torch`, or one trained with configs/teacher_cifar100.py.

Departs from the released code (`kd`): none  # mdistiller / RepDistiller's recipe and loss weights; our BatchNorm keeps the biased variance and the ResNets pool globally (docs/differences.md)
"""
from configs import common

ARGS = common.Args('kd_cifar100', method='kd')


def get_config(arg: str = 'kd'):
  method = ARGS.parse(arg)['method']
  c = common.base()
  c.name = f'kd_{method}'
  c.data.name = 'cifar100'
  c.data.num_workers = -1
  norm = dict(mean=common.CIFAR100_MEAN, std=common.CIFAR100_STD)
  c.model = common.ConfigDict(dict(name='resnet8x4', **norm))
  c.teacher = common.ConfigDict(dict(name='resnet32x4', checkpoint='', **norm))
  common.sgd_recipe(c)
  c.distill.method = method
  c.distill.temperature = 4.0
  if method in ('kd', 'ctkd'):
    c.distill.base_weight = 0.1
    c.distill.distill_weight = 0.9
  elif method in ('dkd', 'pkcd'):
    c.distill.base_weight = 1.0
  c.distill.dkd_alpha, c.distill.dkd_beta, c.distill.dkd_warmup_epochs = 1.0, 8.0, 20
  c.distill.ctkd_ramp_epochs = 10
  c.log_every_steps = 200
  c.lock()
  return c
