r"""ResNet32x4 teacher on Tiny ImageNet at 64 px (the teacher of configs/tikd_tinyimagenet.py).

  python main.py --config=configs/teacher_tinyimagenet.py --workdir=workdirs/resnet32x4_tin \
      --config.data.dir=/path/to/tiny-imagenet

Data: an image folder `DIR/train/<class>/*.JPEG`, `DIR/val/<class>/*.JPEG` (200 classes). The
released TIKD code ships no Tiny ImageNet teacher or its recipe; this is RepDistiller's CIFAR
recipe (SGD 0.05, momentum 0.9, wd 5e-4, batch 64, 240 epochs, x0.1 at 150/180/210) at 64 px with
a random 64 px crop of the image padded by 8 and a flip, Tiny ImageNet statistics. The CIFAR
ResNet pools globally, so the same network reads 64 px (a 16 x 16 map before pooling). No
reference accuracy. Argument: the architecture (default resnet32x4).

Departs from the released code (`resnet32x4`): none  # the released code has no Tiny ImageNet teacher recipe
"""
from configs import common

ARGS = common.Args('teacher_tinyimagenet', positional=(('arch', None, 'resnet32x4'),))


def get_config(arg: str = 'resnet32x4'):
  arch = ARGS.parse(arg)['arch']
  c = common.base()
  c.name = f'teacher_{arch}_tinyimagenet'
  c.data.update(
      dict(name='image_folder', image_size=64, crop_padding=8, train_split='train',
           eval_split='val', num_workers=-1))
  c.model = common.ConfigDict(
      dict(name=arch, mean=common.TINY_IMAGENET_MEAN, std=common.TINY_IMAGENET_STD))
  c.distill.method = 'none'
  common.sgd_recipe(c)
  c.log_every_steps = 100
  c.lock()
  return c
