r"""TIKD ViT students on CIFAR-100 with a ResNet32x4 teacher, DeiT's recipe (README "TIKD").

  python main.py --config=configs/tikd_cifar100.py:large --workdir=workdirs/tikd_large \
      --config.data.dir=/path/to/cifar --config.teacher.checkpoint=workdirs/resnet32x4

Argument: `small|medium|large` (1.09M / 4.17M / 16.35M with text modules), optionally followed
by a distillation method: `configs/tikd_cifar100.py:medium,dkd` (none|soft|hard|kd|dkd|ctkd|pkcd;
hard KD is the paper's headline), and `,notext` for the vision-only DeiT student (no stages, no
text features needed). Reported top-1: 65.20 / 75.70 / 80.42.
Stages: a vision-only KD warm-up (50 epochs), then joint text-image training (250 epochs).
"""
from configs import common


def get_config(arg: str = 'large'):
  size, method, notext = (arg.split(',') + ['', ''])[:3]
  if size not in ('small', 'medium', 'large') or notext not in ('', 'notext'):
    raise ValueError(f"tikd_cifar100 takes small|medium|large[,method][,notext], got {arg!r}")
  c = common.base()
  c.name = f'tikd_{size}'
  c.data.name = 'cifar100'
  c.data.num_workers = -1
  c.model.variant = size
  c.model.drop_path = 0.1
  c.distill.method = method or 'hard'
  c.distill.temperature = 1.0 if c.distill.method == 'soft' else 4.0  # DeiT's tau for soft
  # DeiT recipe: AdamW lr 5e-4 × batch/512, wd 0.05, 300 epochs, 5 warm-up epochs, smoothing 0.1.
  c.batch_size = 256
  c.schedule.lr = 5e-4 * c.batch_size / 512
  c.num_epochs = 300.0
  common.deit_augment(c)
  if not notext:
    common.tikd_stages(c, warmup_epochs=50, joint_epochs=250)
  c.log_every_steps = 100
  c.lock()
  return c
