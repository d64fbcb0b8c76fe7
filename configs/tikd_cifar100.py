r"""TIKD ViT students on CIFAR-100 with a ResNet32x4 teacher, DeiT's recipe (docs/tikd.md).

  python main.py --config=configs/tikd_cifar100.py:large --workdir=workdirs/tikd_large \
      --config.data.dir=/path/to/cifar --config.teacher.checkpoint=workdirs/resnet32x4

Argument: `small|medium|large`, then optionally, comma separated: a distillation method (any of
`tikd_jax.losses.METHODS`; hard KD is the paper's headline, the default), e.g.
`configs/tikd_cifar100.py:medium,dkd`; `notext` for the vision-only DeiT student (no stages, no
text features needed); `released` for the released code's recipe (docs/released_recipe.md);
`norm=imagenet` feeds the student ImageNet-normalised images as the released code does (default
`cifar`: CIFAR-100 statistics). Paper top-1: 65.20 / 75.70 / 80.42 (the released model, fused with
text at test time; no run of ours at this scale yet).

The default is OUR design, not the released method: a vision-only KD warm-up (50 epochs), then
joint text-image training (250) with our fusion gate and text-guided self-distillation, and it is
evaluated on the vision-only first pass (no text at test time; docs/caption_free.md). Batch 256
(one device), no model EMA, no repeated augmentation. 8 heads at every size (the released
registry: 2 / 4 / 8). On a GPU whose host has too few cores for RandAugment (docs/scaling_out.md),
add `--config.augment.randaugment_on=device`.

Departs from the released code (`large`):
  tikd.eval_text = 'none'  # test on the first pass, no caption (released: fused, caption rows 0..b-1)
  stages = [dict(name='vision_warmup', epochs=50, fuse_text=False), dict(name='joint', epochs=250, fuse_text=True)]  # ours; released: one fused phase
  tikd.fusion_gate = True  # ours: the fused pass enters through a zero-initialised gain
  tikd.self_distill_weight = 1.0  # ours: fused pass teaches the first pass
  tikd.text_predictor_weight = 1.0  # ours: the text predictor (caption-free inference)
  tikd.alignment_beta = 0.1  # released computes the alignment loss but never adds it
  tikd.text_rows = 'index'  # each image its own caption (released: rows 0..b-1 of the file)
  model.text_proj_layout = None  # unset: the model's 'shared', one text_proj (released: one per block)
  model.heads = None  # the size table's 8 (released: 2 / 4 / 8 for small / medium / large)
  model.mean = (0.5071, 0.4865, 0.4409)  # CIFAR-100 statistics (released: ImageNet's)
  distill.base = 'deit'  # CE on the smoothed mixed target (released: its argmax, unsmoothed)
  distill.temperature = 4.0  # released --distillation-tau 0.2
  batch_size = 256  # released launch: 4 GPUs x 256 = 1,024
  schedule.lr = 0.00025  # 5e-4 x 256 / 512 (released: 1e-3)
  ema.decay = 0.0  # released: model EMA 0.99996
  data.repeated_aug = 0  # released: DeiT's RASampler, 3 repeats

Departs from the released code (`large,hard,released`):
  model.mean = (0.5071, 0.4865, 0.4409)  # CIFAR-100 statistics; `norm=imagenet` restores ImageNet's
  model.text_proj_layout = 'per_block'  # same modules; ours sized width -> head_dim, released 512 -> head_dim (equal at large)
  distill.method = 'hard'  # the launch passes no --distillation-type ('none'): use `large,none,released`

`released` (JSJ515-Group/TIKD main.py, losses.py, models.py), e.g. `large,hard,released`:
  * base loss CE of the class head against the argmax of the mixed target, unsmoothed, and that
    argmax as DKD's / PKCD's label (distill.base='released'); τ 0.2 (its --distillation-tau);
  * the released registry's heads, 2 / 4 / 8 for small / medium / large (model.heads), and no text
    predictor (model.text_predictor=False): large counts the released 16,352,264 parameters;
  * per-block value projections `blocks.i.attn.text_proj` (model.text_proj_layout='per_block');
  * text fused in every step from the first (no stages), with rows 0..b−1 of the caption
    features for every GPU batch of b (tikd.text_rows='released') and eval_text='released';
  * no alignment loss (computed but never added there) and no text predictor loss (it has none);
  * its model EMA (timm ModelEma, decay 0.99996 per step), evaluated beside the raw weights
    (metrics `ema_top1`, …; the released code only saves it).
  * its README launch, 4 GPUs × --batch-size 256: a global batch of 1,024 at lr 5e-4 · 1,024 / 512
    = 1e-3 (main.py's linear scaling), drawn by DeiT's repeated-augmentation sampler (on by
    default there) over 4 replicas of 256, each replica's rows meeting caption rows 0..255, and
    the per-GPU eval batch 1.5 × 256 = 384. On one device the 1,024 rows are one batch (lower
    `--config.batch_size` with `--config.grad_accum_steps` to fit memory).
  Still different: small / medium cannot fuse 512-d text in the released code (its text_proj is
  Linear(512, head_dim) on width-d tokens); ours adapts the text to the width (docs/tikd.md).
The launch passes no --distillation-type, whose default is 'none': `large,none,released` is that
launch as written; the paper's headline (and our default) is hard KD.
"""
from configs import common

# The released README's training launch: torch.distributed.launch --nproc_per_node=4 … --batch-size
# 256 (JSJ515-Group/TIKD README_tikd.md, "Training").
RELEASED_GPUS, RELEASED_GPU_BATCH = 4, 256
# The released model registry's heads (models.py tikd_{tiny,small,base}_distilled_patch4_32).
RELEASED_HEADS = {'small': 2, 'medium': 4, 'large': 8}
NORMS = {
    'cifar': (common.CIFAR100_MEAN, common.CIFAR100_STD),
    'imagenet': (common.IMAGENET_MEAN, common.IMAGENET_STD),  # the released datasets.py
}
FLAGS = ('notext', 'released')
ARGS = common.Args('tikd_cifar100', positional=(('size', ('small', 'medium', 'large'), None),),
                   method='hard', flags=FLAGS, exclusive=(FLAGS,),
                   options={'norm': common.choice(*NORMS)})


def get_config(arg: str = 'large'):
  return build(ARGS.parse(arg))


def build(args: dict):
  """The config of parsed arguments (`ARGS.parse`): size, method, notext, released, norm."""
  size, method = args['size'], args['method']
  flags = {f for f in FLAGS if args[f]}
  c = common.base()
  c.name = f'tikd_{size}' + ('_released' if 'released' in flags else '')
  c.data.name = 'cifar100'
  c.data.num_workers = -1
  c.model.variant = size
  c.model.drop_path = 0.1
  c.model.mean, c.model.std = NORMS[args.get('norm', 'cifar')]
  c.distill.method = method
  c.distill.temperature = 1.0 if c.distill.method == 'soft' else 4.0  # DeiT's tau for soft
  # DeiT recipe: AdamW lr 5e-4 × batch/512, wd 0.05, 300 epochs, 5 warm-up epochs, smoothing 0.1.
  c.batch_size = 256
  c.schedule.lr = 5e-4 * c.batch_size / 512
  c.num_epochs = 300.0
  common.deit_augment(c)
  if 'released' in flags:
    released_recipe(c)
    c.model.heads = RELEASED_HEADS[size]
  elif 'notext' not in flags:
    common.tikd_stages(c, warmup_epochs=50, joint_epochs=250)
  c.log_every_steps = 100
  c.lock()
  return c


def released_recipe(c: common.ConfigDict) -> None:
  """The released TIKD code's training (module docstring), on the DeiT recipe above."""
  c.distill.base = 'released'
  c.distill.temperature = 0.2  # released main.py --distillation-tau default, for every method
  c.model.text_proj_layout = 'per_block'
  c.model.text_predictor = False  # the released model has none (and so no 'predicted' eval)
  c.tikd.fuse_text = True  # one phase: the released model fuses in every forward
  c.tikd.text_rows = 'released'
  c.tikd.eval_text = 'released'
  c.tikd.fusion_text = 'caption'  # the released fusion trains on the caption rows it is given
  c.tikd.self_distill_weight = 0.0  # and has no self-distillation term (our design (c))
  c.tikd.fusion_gate = False  # nor a gate on the fused pass
  # The README launch: one global batch = the 4 GPUs' batches; main.py scales the lr by the
  # global batch (lr · batch_size · world_size / 512, unless --unscale-lr).
  c.batch_size = RELEASED_GPUS * RELEASED_GPU_BATCH
  c.schedule.lr = 5e-4 * c.batch_size / 512
  # --repeated-aug is on by default; under the distributed launch main.py draws with DeiT's
  # RASampler (3 repeats) over the world's GPUs, here the replicas of data/repeated_aug.py.
  c.data.repeated_aug = 3
  c.data.repeated_aug_replicas = RELEASED_GPUS
  # Its eval batch is 1.5 × the per-GPU batch (main.py data_loader_val; without --dist-eval every
  # GPU evaluates the whole test set); with text rows 0..b-1 per eval batch of b, this decides
  # which test image meets which caption row.
  c.eval_batch_size = int(1.5 * RELEASED_GPU_BATCH)
  c.tikd.alignment_beta = 0.0
  c.tikd.text_predictor_weight = 0.0
  c.ema.decay = 0.99996  # main.py --model-ema (on by default), --model-ema-decay
