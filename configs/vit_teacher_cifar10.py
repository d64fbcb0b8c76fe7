r"""IRKD's patch-4 ViT teacher on CIFAR-10, trained from scratch (IRKD paper: 86.00%).

  python main.py --config=configs/vit_teacher_cifar10.py --workdir=workdirs/vit_teacher_p4 \
      --config.data.dir=/path/to/cifar

A plain ViT (cls token only): 384 wide, 12 layers, 6 heads, MLP 1536, patch 4; 45k/5k split.
DeiT recipe (AdamW, cosine, warm-up, RandAugment, Mixup/CutMix, erasing, smoothing 0.1).
"""
from configs import common


def get_config(arg: str = ''):
  del arg
  c = common.base()
  c.name = 'vit_teacher_cifar10'
  c.data.name = 'cifar10'
  c.data.val_size = 5000
  c.data.val_seed = 42
  c.data.num_workers = -1
  c.model = common.ConfigDict(
      dict(name='vit', variant='irkd_teacher', patch_size=4, drop_path=0.1,
           mean=common.CIFAR10_MEAN, std=common.CIFAR10_STD))
  c.distill.method = 'none'
  common.deit_augment(c)
  c.batch_size = 256
  c.schedule.lr = 5e-4 * c.batch_size / 512
  c.num_epochs = 300.0
  c.log_every_steps = 100
  c.lock()
  return c
