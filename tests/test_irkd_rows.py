"""configs/irkd_cifar10.py's rows against IRKD's notebooks: which model each row trains (a plain
ViT for ce / cl, ViTWithDistillation for the kd rows), which parameters its AdamW decays (P_4_ALL's
decay groups, the P2 notebooks' plain AdamW), and the P2 teacher it loads."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import deit_teacher_cifar10, irkd_cifar10, irkd_digits, vit_teacher_cifar10
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import optim
from tikd_jax.train.plan import build_phases
from tikd_jax.train.run import model_spec
from tikd_jax.tree import flatten

# P_4_ALL cells 1, 3, 8, 11, 14: AdamW([{decay params, weight_decay 1e-4}, {no-decay params, 0}])
# with no_decay = ["bias", "LayerNorm.weight"] matched as substrings of named_parameters().
NB_P4_NO_DECAY = ('bias', 'LayerNorm.weight')
NB_WEIGHT_DECAY, NB_LR = 1e-4, 3e-4

# Our parameter → its Hugging Face name(s), transformers 4 (the notebooks' names, and the names
# every checkpoint on disk still has). qkv is HF's query, key and value.
_HF = [
    (r'cls_token', ['vit.embeddings.cls_token']),
    (r'pos_embed', ['vit.embeddings.position_embeddings']),
    (r'dist_token', ['distill_token']),
    (r'patch_embed/(?P<w>\w+)', ['vit.embeddings.patch_embeddings.projection.{w}']),
    (r'blocks/(?P<i>\d+)/norm1/(?P<w>\w+)', ['vit.encoder.layer.{i}.layernorm_before.{w}']),
    (r'blocks/(?P<i>\d+)/norm2/(?P<w>\w+)', ['vit.encoder.layer.{i}.layernorm_after.{w}']),
    (r'blocks/(?P<i>\d+)/attn/qkv/(?P<w>\w+)',
     [f'vit.encoder.layer.{{i}}.attention.attention.{q}.{{w}}' for q in ('query', 'key', 'value')]),
    (r'blocks/(?P<i>\d+)/attn/proj/(?P<w>\w+)',
     ['vit.encoder.layer.{i}.attention.output.dense.{w}']),
    (r'blocks/(?P<i>\d+)/mlp/fc1/(?P<w>\w+)', ['vit.encoder.layer.{i}.intermediate.dense.{w}']),
    (r'blocks/(?P<i>\d+)/mlp/fc2/(?P<w>\w+)', ['vit.encoder.layer.{i}.output.dense.{w}']),
    (r'norm/(?P<w>\w+)', ['vit.layernorm.{w}']),
    (r'head/(?P<w>\w+)', ['classifier.{w}']),
    (r'head_dist/(?P<w>\w+)', ['distiller.{w}']),
]
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def hf_names(key: str) -> list[str]:
  for pattern, targets in _HF:
    m = re.fullmatch(pattern, key)
    if m:
      groups = m.groupdict()
      if 'w' in groups:
        groups['w'] = _TORCH_LEAF[groups['w']]
      return [t.format(**groups) for t in targets]
  raise AssertionError(f'no Hugging Face name for {key}')


@pytest.fixture(scope='module')
def hf_vit_names(tmp_path_factory):
  """named_parameters() of the notebooks' students, from a real transformers ViTModel of
  ViT-Tiny's depth saved to disk (transformers 4 names): {row kind: names}."""
  from safetensors.torch import load_file
  from transformers import ViTConfig, ViTModel
  folder = tmp_path_factory.mktemp('hf_vit')
  ViTModel(
      ViTConfig(hidden_size=24, num_hidden_layers=12, num_attention_heads=3, intermediate_size=48,
                image_size=32, patch_size=4)).save_pretrained(folder)
  vit = {f'vit.{k}' for k in load_file(folder / 'model.safetensors')}
  heads = {'classifier.weight', 'classifier.bias'}
  distill = {'distill_token', 'distiller.weight', 'distiller.bias'}
  pooler = {'vit.pooler.dense.weight', 'vit.pooler.dense.bias'}
  return {
      # ce: ViTForImageClassification (P_4_ALL cell 1; no pooler) / ViTModel + classifier
      # (P_2_OUR_STUDENT cell 14); cl: ViTModel + classifier (P_4_ALL cell 3, P_2_OUR_STUDENT
      # cell 8). The pooler of a ViTModel never runs.
      'plain': (vit | heads, pooler),
      # kd rows: ViTWithDistillation (P_4_ALL cells 8, 11, 14): ViTModel + distill_token +
      # classifier + distiller; it calls vit.encoder directly, so vit.layernorm never runs either.
      'distilled': (vit | heads | distill, pooler | {'vit.layernorm.weight', 'vit.layernorm.bias'}),
  }


def _decayed(c, params) -> dict[str, bool]:
  """Per parameter, whether the config's real optimizer decays it: one AdamW update with zero
  gradients of all-ones parameters is −lr·wd where weight decay applies and 0 where it does not."""
  tx = optim.make_optimizer(c.optimizer, optim.make_schedule(c.schedule, 351, 351 * 60), params)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, ones), tx.init(ones), ones)
  out = {}
  for key, u in flatten(updates).items():
    u = np.asarray(u)
    assert np.all(u == u.flat[0]), key
    np.testing.assert_allclose(u.flat[0], -NB_LR * NB_WEIGHT_DECAY if u.flat[0] else 0.0, rtol=1e-6,
                               err_msg=key)
    out[key.removeprefix('student/')] = bool(u.flat[0] != 0.0)
  return out


@pytest.mark.parametrize('patch', ['p4', 'p2'])
@pytest.mark.parametrize('row', irkd_cifar10.ROWS)
def test_row_trains_the_notebooks_model_with_its_decay_groups(row, patch, hf_vit_names):
  c = irkd_cifar10.get_config(f'{row},{patch}')
  kd = row.startswith('kd')
  name, kwargs = model_spec(c.model, 10)
  assert name == ('irkd_vit' if kd else 'vit')
  # The same ViT-Tiny for every row: only the tokens and the final norm differ.
  assert (c.model.variant, c.model.patch_size) == ('vit_tiny', 2 if patch == 'p2' else 4)
  model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))
  params = {'student': model_variables(model)['params'], 'objective': {}}
  keys = set(flatten(params['student']))
  assert ('dist_token' in keys, 'head_dist/kernel' in keys) == (kd, kd)
  assert ('norm/scale' in keys) == (not kd)  # ViTModel's final layernorm; ViTWithDistillation
  # skips it
  assert model.num_prefix == (2 if kd else 1)

  # Our parameters are the notebook's, name for name (the HF model's unused ones aside).
  hf, never_run = hf_vit_names['distilled' if kd else 'plain']
  ours = {n for key in keys for n in hf_names(key)}
  assert ours == hf - never_run

  decayed = _decayed(c, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params))
  assert decayed.keys() == keys
  for key in keys:
    if patch == 'p4':  # the notebook's rule on the notebook's names
      want = {not any(nd in n for nd in NB_P4_NO_DECAY) for n in hf_names(key)}
      assert len(want) == 1, key
      assert decayed[key] == want.pop(), key
    else:  # P2: AdamW(student.parameters(), weight_decay=1e-4): everything
      assert decayed[key], key
  if patch == 'p4':  # named: the biases are spared, norm scales, tokens and kernels decay
    assert not any(decayed[k] for k in ('blocks/0/attn/qkv/bias', 'blocks/11/norm1/bias',
                                        'head/bias', 'patch_embed/bias'))
    assert all(decayed[k] for k in ('cls_token', 'pos_embed', 'blocks/0/norm1/scale',
                                    'blocks/0/attn/qkv/kernel', 'patch_embed/kernel'))
    assert decayed['dist_token' if kd else 'norm/scale']


def test_custom_student_rows_keep_their_size():
  for row in ('ce', 'cl', 'kd'):
    c = irkd_cifar10.get_config(f'{row},p2,custom')
    assert (c.model.name, c.model.variant,
            c.model.patch_size) == ('irkd_vit' if row == 'kd' else 'vit', 'irkd_custom', 2)


def test_p2_teacher_is_the_fine_tuned_deit_of_deit_teacher_cifar10():
  """The teacher the p2 rows load is the model configs/deit_teacher_cifar10.py:p2 trains: the
  same architecture, the cls head's logits (DeiTForImageClassification) and its CIFAR-10
  normalisation (P_2_OUR_STUDENT cell 3, P_2_KD_CL cell 1)."""
  fine_tuned = deit_teacher_cifar10.get_config('p2').model
  for row in ('kd', 'kd_cl', 'kd_cl_sal'):
    teacher = irkd_cifar10.get_config(f'{row},p2').teacher
    for field in ('name', 'variant', 'patch_size', 'eval_head', 'layer_norm_eps', 'mean', 'std'):
      assert teacher[field] == fine_tuned[field], (row, field)
  assert teacher.eval_head == 'cls'


def test_digits_rows_train_the_same_model_kinds():
  c = irkd_digits.get_config()
  for row in irkd_cifar10.ROWS:
    assert c.runs[row].model.name == irkd_cifar10.get_config(f'{row},p4').model.name
    assert tuple(c.runs[row].optimizer.wd_exclude) == ('bias$',)


# Where each curriculum row's notebook creates its optimizer: inside the stage loop (True, fresh
# AdamW moments at every resolution) or once before it (False).
NB_OPTIMIZER_PER_STAGE = {
    ('cl', 'p4', 'vit_tiny'): False,  # P_4_ALL cell 3: optimizer = optim.AdamW(...) before
    ('kd_cl', 'p4', 'vit_tiny'): True,  # P_4_ALL cell 11: optimizer_s = ... in `for res, epochs`
    ('kd_cl_sal', 'p4', 'vit_tiny'): True,  # P_4_ALL cell 14: the same
    ('cl', 'p2', 'custom'): False,  # P_2_OUR_STUDENT cell 8: before `for resolution, epochs`
    ('kd_cl', 'p2', 'custom'): True,  # P_2_OUR_STUDENT cell 3: optimizer_s inside the stage loop
    ('kd_cl_sal', 'p2', 'custom'): False,  # P_2_OUR_STUDENT_SAL_MAP cell 1: opt before the loop
    ('kd_cl', 'p2', 'vit_tiny'): False,  # P_2_KD_CL cell 1: opt before the loop
    ('kd_cl_sal', 'p2', 'vit_tiny'): False,  # P_2_SaliencyMap cell 1: opt before the loop
}


def test_curriculum_rows_recreate_the_optimizer_where_their_notebook_does():
  for (row, patch, student), per_stage in NB_OPTIMIZER_PER_STAGE.items():
    c = irkd_cifar10.get_config(f'{row},{patch},{student}')
    phases = build_phases(c, steps_per_epoch=10)
    assert [p.resolution for p in phases] == list(irkd_cifar10.RESOLUTIONS)
    # The first stage starts fresh anyway; the next five do only where the notebook says so.
    assert [p.reset_optimizer for p in phases] == [False] + [per_stage] * 5, (row, patch, student)


# P_4_ALL cell 14 (kd_cl_sal, p4): multi_layer_attention_loss over layer_indices = range(12),
# gamma 0.8. P_2_SaliencyMap cell 1 (ViT-Tiny) and P_2_OUR_STUDENT_SAL_MAP cell 1 (custom):
# SaliencyDistiller(student, teacher, layer_idxs=list(range(12)) / [0, 2, 3]), gamma 0.8.
NB_SALIENCY = {
    'p4': ('attention', ''),
    'p2': ('gradient', 'all'),
    'p2,custom': ('gradient', '0,2,3'),
}
NB_GAMMA = 0.8


@pytest.mark.parametrize('notebook', sorted(NB_SALIENCY))
def test_saliency_row_uses_its_notebooks_saliency(notebook):
  c = irkd_cifar10.get_config(f'kd_cl_sal,{notebook}')
  assert (c.saliency.kind, c.saliency.layers) == NB_SALIENCY[notebook]
  assert c.saliency.weight == NB_GAMMA
  terms = dict(build_phases(c, 10)[0].terms)
  assert terms[f'{NB_SALIENCY[notebook][0]}_saliency'] == NB_GAMMA
  other = 'gradient' if NB_SALIENCY[notebook][0] == 'attention' else 'attention'
  assert f'{other}_saliency' not in terms


# P_4_ALL cell 5, the P4 teacher: ViTConfig(hidden_size=384, num_hidden_layers=12,
# num_attention_heads=6, intermediate_size=1536, patch_size=4, hidden_dropout_prob=0.1,
# attention_probs_dropout_prob=0.1); train_tf replaced by val_tf (ToTensor, Normalize) through
# `val_ds.dataset.transform = val_tf`; per batch mixup_data(alpha=0.2) or cutmix_data(alpha=1.0)
# at even odds; CrossEntropyLoss(label_smoothing=0.01); best_val, no_imp, patience = 0.0, 0, 150,
# the best epoch's weights saved and reloaded for the test.
NB_P4_TEACHER = dict(dim=384, depth=12, heads=6, mlp=1536, patch=4, dropout=0.1, attn_dropout=0.1,
                     mixup=0.2, cutmix=1.0, switch=0.5, smoothing=0.01, patience=150, epochs=135)


def test_p4_teacher_is_the_notebooks_cell_line_by_line():
  nb = NB_P4_TEACHER
  c = vit_teacher_cifar10.get_config()
  name, kwargs = model_spec(c.model, 10)
  model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))
  s = model.size
  assert (name, s.dim, s.depth, s.heads, s.mlp_dim,
          s.patch) == ('vit', nb['dim'], nb['depth'], nb['heads'], nb['mlp'], nb['patch'])
  assert (model.dropout, model.attn_dropout) == (nb['dropout'], nb['attn_dropout'])
  # The transform the cell's teacher ran: none per image.
  assert (c.data.crop_padding, c.data.flip, c.augment.randaugment,
          c.augment.erasing_prob) == (0, False, False, 0.0)
  assert (c.augment.mixup_alpha, c.augment.cutmix_alpha,
          c.augment.switch_prob) == (nb['mixup'], nb['cutmix'], nb['switch'])
  assert c.label_smoothing == nb['smoothing'] and c.num_epochs == nb['epochs']
  assert (c.curriculum.val_transform, c.curriculum.val_split,
          c.curriculum.patience) == ('resize', 'val', nb['patience'])
  # The transforms the cell defined but never ran are named switches.
  on = vit_teacher_cifar10.get_config('crop_flip,randaugment,erasing')
  assert (on.data.crop_padding, on.data.flip, on.augment.randaugment,
          on.augment.erasing_prob) == (4, True, True, 0.1)
  with pytest.raises(ValueError, match='vit_teacher_cifar10 takes'):
    vit_teacher_cifar10.get_config('autoaugment')
