r"""The offline demo: teacher, then students with and without distillation, on real digits.

  python main.py --config=configs/demo.py --workdir=workdirs/demo

scikit-learn's 1,797 handwritten digits (8×8 originals upsampled to 16×16 RGB; 1,437 train / 360
test) need no download. Runs, each in <workdir>/<run>: a CIFAR ResNet teacher (resnet20), then a tiny distilled
ViT student trained with no distillation, with hard KD from that teacher, and with hard KD plus
TIKD's text fusion (class-prompt features from the bundled MiniLM encoder). A table of their
accuracies closes the run. A few minutes on a 2-core CPU.
"""

from configs import common

TEACHER = 'resnet20'


def digits_settings(c):
  """Digits at 16 px and the demo's batch, logging, evaluation and checkpoint cadence."""
  c.data.name = 'digits'
  c.data.image_size = 16  # the originals are 8×8: 16 px loses nothing and keeps the demo fast
  c.data.crop_padding = 2
  c.batch_size = 64
  c.eval_batch_size = 120
  c.log_every_steps = 50
  c.eval_every_epochs = 5.0
  # Checkpoints come with every evaluation (every 5 epochs, 110 steps); saving every epoch cost
  # ~15 s per run of a 1-minute run.
  c.checkpoint_every_steps = 110
  c.label_smoothing = 0.1


def teacher_config():
  c = common.base()
  digits_settings(c)
  c.name = 'teacher'
  c.model = common.ConfigDict(dict(name=TEACHER, mean=common.DIGITS_MEAN, std=common.DIGITS_STD))
  c.distill.method = 'none'
  c.optimizer.name = 'sgd'
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = 'cosine'
  c.schedule.lr = 0.05
  c.schedule.warmup_epochs = 1.0
  c.schedule.min_lr = 0.0
  c.num_epochs = 10.0
  return c


def student_config(method: str):
  c = common.base()
  digits_settings(c)
  c.name = f'student_{method}'
  c.model = common.ConfigDict(
      dict(name='distilled_vit', variant='demo', img_size=16, drop_path=0.0,
           mean=common.DIGITS_MEAN, std=common.DIGITS_STD))
  c.teacher = common.ConfigDict(
      dict(name=TEACHER, checkpoint='{workdir}/teacher', mean=common.DIGITS_MEAN,
           std=common.DIGITS_STD))
  c.distill.method = method
  c.schedule.lr = 3e-3
  c.schedule.warmup_epochs = 2.0
  c.num_epochs = 30.0
  return c


def tikd_student_config():
  """Hard KD + TIKD fusion with class-prompt text features from the offline MiniLM encoder:
  a vision-only warm-up stage, then joint text-image training (README "TIKD")."""
  c = student_config('hard')
  c.name = 'student_tikd'
  c.text.features_dir = '{workdir}/text/digits-train'
  c.text.class_prompt_encoder = 'minilm'
  c.text.class_prompt_template = 'a photo of the digit {name}.'
  common.tikd_stages(c, warmup_epochs=10, joint_epochs=20)
  return c


def get_config(arg: str = ''):
  del arg
  c = common.ConfigDict()
  c.summary_title = 'Digits demo: test accuracy (360 images)'
  c.runs = common.ConfigDict()
  c.runs.teacher = teacher_config()
  c.runs.student_none = student_config('none')
  c.runs.student_hard = student_config('hard')
  c.runs.student_tikd = tikd_student_config()
  c.run_order = ('teacher', 'student_none', 'student_hard', 'student_tikd')
  c.lock()
  return c
