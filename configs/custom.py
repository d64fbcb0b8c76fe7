r"""Your own images: a CIFAR ResNet teacher, then a distilled ViT student (README "Train on your
own images").

  python main.py --config=configs/custom.py:teacher --workdir=workdirs/my_teacher \
      --config.data.dir=/path/to/images
  python main.py --config=configs/custom.py:hard --workdir=workdirs/my_student \
      --config.data.dir=/path/to/images --config.teacher.checkpoint=workdirs/my_teacher

Data: an image folder `DIR/train/<class>/*.png|jpg…` with `DIR/val/<class>/…` (or `test/`) beside
it, any class count from 2; or a prepared TFDS data set (`--config.data.name=tfds
--config.data.tfds_name=NAME --config.data.dir=TFDS_DIR`). Images are resized to
`data.image_size` (32; image folders only, TFDS images are used at their stored size: set
image_size to it), and the ViT's img_size follows it. Mean/std are measured on the train split
(data.normalization='compute', saved as <workdir>/normalization.json); unreadable images stop the
run (data.bad_images='error'; 'skip' leaves them out with a warning).

Argument: `teacher` (resnet20, SGD 0.05, cosine) or the student's distillation method (any of
`tikd_jax.losses.METHODS`: none, soft, hard, kd, dkd, ctkd, pkcd, …; hard KD by default): a `small` ViT (patch 4), AdamW 5e-4, cosine. Both
train for 100 epochs, batch 64: starting points to override (--config.num_epochs=…).

Departs from the released code (`hard`): none  # your own data: no released counterpart; its TIKD student follows configs/tikd_cifar100.py's default design (docs/differences.md)
"""
from configs import common

TEACHER = 'resnet20'
ARGS = common.Args('custom', method='hard', flags=('teacher',), exclusive=(('teacher', 'method'),),
                   usage='teacher or a method ({methods})')


def get_config(arg: str = 'hard'):
  args = ARGS.parse(arg)
  arg = 'teacher' if args['teacher'] else args['method']
  c = common.base()
  c.name = 'teacher' if arg == 'teacher' else f'student_{arg}'
  c.data.name = 'image_folder'
  c.data.image_size = 32
  c.data.normalization = 'compute'
  c.data.num_workers = -1  # decode in one worker process per spare core (at most 16)
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 100.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 0  # every epoch
  # mean/std: placeholders, replaced by the train split's (data.normalization='compute').
  norm = dict(mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD)
  c.teacher = common.ConfigDict(dict(name=TEACHER, checkpoint='', **norm))
  if arg == 'teacher':
    c.model = common.ConfigDict(dict(name=TEACHER, **norm))
    c.distill.method = 'none'
    common.sgd_recipe(c)
    c.schedule.name = 'cosine'
    c.schedule.warmup_epochs = 1.0
    c.schedule.min_lr = 0.0
    c.batch_size = 64
    c.num_epochs = 100.0
  else:
    c.model = common.ConfigDict(
        dict(name='distilled_vit', variant='small', img_size=c.data.get_ref('image_size'),
             drop_path=0.1, **norm))
    c.distill.method = arg
    c.schedule.lr = 5e-4
  c.lock()
  return c
