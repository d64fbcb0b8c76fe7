r"""ResNet32x4 teacher on CIFAR-100 with the RepDistiller recipe: 79.42% reported (RepDistiller).

  python main.py --config=configs/teacher_cifar100.py --workdir=workdirs/resnet32x4 \
      --config.data.dir=/path/to/folder/with/cifar-100-python.tar.gz

The argument picks the architecture, then optionally the data set: `resnet8x4`,
`resnet32x4,cifar10` (the teacher of configs/tikd_cifar10.py: the same recipe on CIFAR-10 with
its normalisation; no reference number, RepDistiller reports CIFAR-100 only).

Departs from the released code (`resnet32x4`): none  # RepDistiller's recipe; our BatchNorm keeps the biased variance and the ResNets pool globally (docs/differences.md)
"""
from configs import common

DATASETS = {
    'cifar100': (common.CIFAR100_MEAN, common.CIFAR100_STD),
    'cifar10': (common.CIFAR10_MEAN, common.CIFAR10_STD)
}
ARGS = common.Args(
    'teacher_cifar100',
    positional=(('arch', None, 'resnet32x4'), ('dataset', tuple(DATASETS), 'cifar100')))


def get_config(arg: str = 'resnet32x4'):
  args = ARGS.parse(arg)
  arch, dataset = args['arch'], args['dataset']
  mean, std = DATASETS[dataset]
  c = common.base()
  c.name = f'teacher_{arch}' + ('' if dataset == 'cifar100' else f'_{dataset}')
  c.data.name = dataset
  c.data.num_workers = -1
  c.model = common.ConfigDict(dict(name=arch, mean=mean, std=std))
  c.distill.method = 'none'
  common.sgd_recipe(c)
  c.log_every_steps = 100
  c.lock()
  return c
