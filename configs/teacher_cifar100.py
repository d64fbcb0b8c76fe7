r"""ResNet32x4 teacher on CIFAR-100 with the RepDistiller recipe: 79.42% reported (RepDistiller).

  python main.py --config=configs/teacher_cifar100.py --workdir=workdirs/resnet32x4 \
      --config.data.dir=/path/to/folder/with/cifar-100-python.tar.gz

The argument picks the architecture: `configs/teacher_cifar100.py:resnet8x4`.
"""
from configs import common


def get_config(arch: str = 'resnet32x4'):
  c = common.base()
  c.name = f'teacher_{arch}'
  c.data.name = 'cifar100'
  c.data.num_workers = -1
  c.model = common.ConfigDict(dict(name=arch, mean=common.CIFAR100_MEAN, std=common.CIFAR100_STD))
  c.distill.method = 'none'
  common.sgd_recipe(c)
  c.log_every_steps = 100
  c.lock()
  return c
