r"""The large TIKD student on Tiny ImageNet: 64 px, patch 4, 200 classes.

  python main.py --config=configs/tikd_tinyimagenet.py --workdir=workdirs/tikd_tin \
      --config.data.dir=/path/to/tiny-imagenet --config.teacher.checkpoint=workdirs/resnet32x4_tin \
      --config.text.features_dir=text/tin-train

Data: an image folder `DIR/train/<class>/*.JPEG` and `DIR/val/<class>/*.JPEG` (sort Tiny
ImageNet's val images into class folders with its val_annotations.txt first). The teacher:
configs/teacher_tinyimagenet.py. Seed model zoo: 65.34 / 85.94 top-1 / top-5, 16.55M parameters,
ResNet32x4 teacher, hard KD (the released large model at 64 px with 200 classes counts
16,553,168; no run of ours). Argument, comma separated: a distillation method (default hard),
then `notext` (vision-only student) or `released` (the released code's recipe, as
configs/tikd_cifar100.py's `released`: per-block text projections, no text predictor, one fused
phase with caption rows 0..b-1, its base loss, τ 0.2, EMA, batch 1,024 with repeated augmentation);
`norm=imagenet` feeds the student ImageNet statistics, as the released datasets.py does (default
`tinyimagenet`: Tiny ImageNet's).

Departs from the released code (`hard`):
  tikd.eval_text = 'none'  # test on the first pass, no caption (released: fused, caption rows 0..b-1)
  stages = [dict(name='vision_warmup', epochs=50, fuse_text=False), dict(name='joint', epochs=250, fuse_text=True)]  # ours; released: one fused phase
  tikd.fusion_gate = True  # ours
  tikd.self_distill_weight = 1.0  # ours
  tikd.text_rows = 'index'  # each image its own caption
  model.text_proj_layout = None  # unset: the model's 'shared' (released: one per block)
  model.mean = (0.4802, 0.4481, 0.3975)  # Tiny ImageNet statistics (released: ImageNet's)
  distill.base = 'deit'  # released: CE on the argmax of the mixed target
  batch_size = 256  # released launch: 4 x 256
  ema.decay = 0.0  # released: 0.99996

Departs from the released code (`hard,released`):
  model.mean = (0.4802, 0.4481, 0.3975)  # `norm=imagenet` restores ImageNet's
  model.text_proj_layout = 'per_block'  # the released modules (text_proj 512 -> 64 at width 512)
"""
from configs import common, tikd_cifar100

NORMS = {
    'tinyimagenet': (common.TINY_IMAGENET_MEAN, common.TINY_IMAGENET_STD),
    'imagenet': (common.IMAGENET_MEAN, common.IMAGENET_STD),
}
FLAGS = ('notext', 'released')
ARGS = common.Args('tikd_tinyimagenet', method='hard', flags=FLAGS, exclusive=(FLAGS,),
                   options={'norm': common.choice(*NORMS)})


def get_config(arg: str = 'hard'):
  args = ARGS.parse(arg)
  c = common.base()
  c.name = 'tikd_tinyimagenet' + ('_released' if args['released'] else '')
  c.data.name = 'image_folder'
  c.data.image_size = 64
  c.data.train_split = 'train'
  c.data.eval_split = 'val'
  c.data.num_workers = -1
  mean, std = NORMS[args['norm']]
  c.model = common.ConfigDict(
      dict(name='distilled_vit', variant='large', img_size=64, drop_path=0.1, mean=mean, std=std))
  # The teacher keeps the statistics it was trained with (configs/teacher_tinyimagenet.py).
  c.teacher = common.ConfigDict(
      dict(name='resnet32x4', checkpoint='', mean=common.TINY_IMAGENET_MEAN,
           std=common.TINY_IMAGENET_STD))
  c.distill.method = args['method']
  c.batch_size = 256
  c.schedule.lr = 5e-4 * c.batch_size / 512
  c.num_epochs = 300.0
  common.deit_augment(c)
  if args['released']:
    tikd_cifar100.released_recipe(c)
    c.model.heads = tikd_cifar100.RELEASED_HEADS['large']
  elif not args['notext']:
    common.tikd_stages(c, warmup_epochs=50, joint_epochs=250)
  c.log_every_steps = 100
  c.lock()
  return c
