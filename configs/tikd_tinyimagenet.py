r"""The large TIKD student on Tiny ImageNet: 64 px, patch 4, 200 classes, 16.55M parameters.

  python main.py --config=configs/tikd_tinyimagenet.py --workdir=workdirs/tikd_tin \
      --config.data.dir=/path/to/tiny-imagenet --config.teacher.checkpoint=DIR \
      --config.text.features_dir=text/tin-train

Data: an image folder `DIR/train/<class>/*.JPEG` and `DIR/val/<class>/*.JPEG` (sort Tiny
ImageNet's val images into class folders with its val_annotations.txt first). Reported: 65.34 /
85.94 with a ResNet32x4 teacher trained on Tiny ImageNet at 64 px. Argument as for
tikd_cifar100 after the size: `[method][,notext]`.
"""
from configs import common

ARGS = common.Args('tikd_tinyimagenet', method='hard', flags=('notext',))


def get_config(arg: str = 'hard'):
  args = ARGS.parse(arg)
  method, notext = args['method'], 'notext' if args['notext'] else ''
  c = common.base()
  c.name = 'tikd_tinyimagenet'
  c.data.name = 'image_folder'
  c.data.image_size = 64
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.num_workers = -1
  norm = dict(mean=common.TINY_IMAGENET_MEAN, std=common.TINY_IMAGENET_STD)
  c.model = common.ConfigDict(
      dict(name='distilled_vit', variant='large', img_size=64, drop_path=0.1, **norm))
  c.teacher = common.ConfigDict(dict(name='resnet32x4', checkpoint='', **norm))
  c.distill.method = method or 'hard'
  c.batch_size = 256
  c.schedule.lr = 5e-4 * c.batch_size / 512
  c.num_epochs = 300.0
  common.deit_augment(c)
  if notext != 'notext':
    common.tikd_stages(c, warmup_epochs=50, joint_epochs=250)
  c.log_every_steps = 100
  c.lock()
  return c
