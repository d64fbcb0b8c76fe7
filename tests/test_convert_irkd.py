"""IRKD's own checkpoints through `python -m convert.from_torch` (issue 32, item 6).

IRKD's notebooks train Hugging Face models and `torch.save(model.state_dict(), …)` them, with
`nn.DataParallel` when there are several GPUs (`module.` prefixes):
  * teachers (and the ce rows) are `ViTForImageClassification`: → our plain `vit`;
  * students are the notebooks' `ViTWithDistillation` (restated below, line by line): a `vit`
    ViTModel, a zero-initialised `distill_token` put after the cls token without a position,
    the encoder layers without `vit.layernorm`, `classifier` on cls, `distiller` on dist: →
    our `irkd_vit`;
  * the P2 teacher is a `DeiTForImageClassification` (one classifier on cls): → our
    `distilled_vit` with `eval_head='cls'`.
Tiny models are built by transformers here, given random weights, saved as the notebooks save
them (with and without `module.`, under transformers 4.x names, which is what every file on
disk holds and what `save_pretrained` still writes, and under transformers 5.x in-memory names),
converted by the CLI's `main` and loaded back with `load_weights`. Logits equal transformers' at
the model's own 32 px and on IRKD's curriculum sizes, where the notebooks call
`interpolate_pos_encoding=True` (bicubic, align_corners False; ours is the same resize).

LayerNorm eps: transformers' default is 1e-12 (what the notebooks ran), timm's 1e-6. A converted
Hugging Face state dict records 1e-12 (model kwarg `layer_norm_eps`; a folder its config's), so
the models here keep transformers' default; what 1e-6 would cost is measured in
`test_transformers_default_layer_norm_eps`.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

from convert import from_torch
from convert.mapping import hf_vit_to_timm
from convert.to_torch import build_flax_model
from tikd_jax.models.variables import load_variables
from tikd_jax.models.vit import resize_pos_embed
from tikd_jax.normalization import CIFAR10_MEAN, CIFAR10_STD
from tikd_jax.train.checkpoint import load_weights

transformers = pytest.importorskip('transformers')
from transformers import ViTConfig, ViTForImageClassification, ViTModel, ViTPreTrainedModel  # noqa: E402

TOL = 1e-5
IMG = 32
# hidden 32 / 2 layers / 2 heads / MLP 64: our SIZES['micro'], which the converter reads off the
# widths (a state dict does not record the number of heads).
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              patch_size=4, image_size=IMG, num_labels=10)


class ViTWithDistillation(ViTPreTrainedModel):
  """IRKD's student, as its notebooks define it (P_4_ALL / Saliency_patch_size2, "KD + CL")."""

  def __init__(self, config: ViTConfig):
    super().__init__(config)
    self.vit = ViTModel(config)  # with its default pooler, which the forward never reads
    self.distill_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
    self.classifier = nn.Linear(config.hidden_size, config.num_labels)
    self.distiller = nn.Linear(config.hidden_size, config.num_labels)
    self.post_init()  # the notebooks' `self.init_weights()`, transformers 5's spelling

  def forward(self, pixel_values):
    b = pixel_values.size(0)
    embeds = self.vit.embeddings(pixel_values, interpolate_pos_encoding=True)
    cls_emb, patch_emb = embeds[:, :1, :], embeds[:, 1:, :]
    x = torch.cat([cls_emb, self.distill_token.expand(b, -1, -1), patch_emb], dim=1)
    # The notebooks' `self.vit.encoder(x)[0]` (transformers 4.x): the layers in turn, no final
    # norm. transformers 5 keeps the layers on the ViTModel itself.
    for layer in self.vit.layers:
      x = layer(x)
    return self.classifier(x[:, 0]), self.distiller(x[:, 1])


def hf_model(kind: str, seed: int = 0, **config):
  """A tiny teacher (`ViTForImageClassification`) or student (`ViTWithDistillation`) with every
  weight moved off its init (zero distill token and biases, unit LayerNorm scales hide mistakes)."""
  torch.manual_seed(seed)
  cfg = ViTConfig(**{**CONFIG, **config})
  model = (ViTForImageClassification if kind == 'teacher' else ViTWithDistillation)(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def hf_logits(model, x: np.ndarray) -> dict[str, np.ndarray]:
  """transformers' logits on [0, 1] NHWC images, normalised as the notebooks do (CIFAR-10)."""
  pixels = (torch.from_numpy(x).permute(0, 3, 1, 2) -
            torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
  with torch.no_grad():
    if isinstance(model, ViTWithDistillation):
      cls, dist = model(pixels)
      return {'logits': cls.numpy(), 'cls_logits': cls.numpy(), 'dist_logits': dist.numpy()}
    # the teacher: the notebooks' eval calls pass interpolate_pos_encoding=True; at the model's
    # own size transformers then keeps the positions as they are (the call without it, too).
    out = model(pixel_values=pixels, interpolate_pos_encoding=x.shape[1] != IMG)
    return {'logits': out.logits.numpy(), 'cls_logits': out.logits.numpy()}


def images(size: int, n: int = 3, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def state_dict_named(model, names: str, tmp_path) -> dict[str, torch.Tensor]:
  """The model's weights under transformers 5.x names (its state_dict) or 4.x names (what
  transformers' own `save_pretrained` writes to disk, the names the notebooks' files hold)."""
  if names == '5.x':
    sd = model.state_dict()
    assert 'vit.layers.0.attention.q_proj.weight' in sd
    return sd
  from safetensors.torch import load_file
  folder = tmp_path / 'save_pretrained'
  model.save_pretrained(folder)
  sd = load_file(folder / 'model.safetensors')
  assert {
      'vit.encoder.layer.0.attention.attention.query.weight',
      'vit.encoder.layer.0.attention.output.dense.weight',
      'vit.encoder.layer.1.intermediate.dense.bias', 'vit.encoder.layer.1.output.dense.weight',
      'vit.encoder.layer.0.layernorm_before.weight', 'vit.encoder.layer.1.layernorm_after.bias'
  } <= set(sd)
  return sd


def save_like_the_notebooks(model, sd, path, data_parallel: bool):
  """torch.save(model.state_dict()) of the bare model, or of `nn.DataParallel(model)`."""
  if data_parallel:
    wrapped = nn.DataParallel(model).state_dict()  # on CPU too: 'module.' + every key
    assert set(wrapped) == {f'module.{k}' for k in model.state_dict()}
    sd = {f'module.{k}': v for k, v in sd.items()}
  torch.save(sd, path)


def convert_and_load(checkpoint, out, *flags):
  from_torch.main(['--checkpoint', str(checkpoint), '--out', str(out), *flags])
  meta, flat = load_weights(str(out))
  model = build_flax_model(meta['model'])
  load_variables(model, flat)
  return meta, model


def our_logits(model, x: np.ndarray) -> dict[str, np.ndarray]:
  logits, out = model(x, train=False)
  res = {'logits': np.asarray(logits), 'cls_logits': np.asarray(out['cls_logits'])}
  if 'dist_logits' in out:
    res['dist_logits'] = np.asarray(out['dist_logits'])
  return res


def max_diff(ours: dict, theirs: dict) -> dict[str, float]:
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    assert float(np.std(theirs[k])) > 1e-2, f'{k}: degenerate logits'
  return {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs}


# --------------------------------------------------------------------------- state dict files
CASES = [(kind, names, dp)
         for kind in ('teacher', 'student')
         for names in ('4.x', '5.x')
         for dp in (True, False)]


@pytest.mark.parametrize('kind,names,data_parallel', CASES,
                         ids=[f'{k}-{n}-{"module" if d else "bare"}' for k, n, d in CASES])
def test_notebook_state_dict_gives_transformers_logits(tmp_path, kind, names, data_parallel):
  hf = hf_model(kind)
  path = tmp_path / 'small_p_4_correct_teacher_weights.pth'
  save_like_the_notebooks(hf, state_dict_named(hf, names, tmp_path), path, data_parallel)
  meta, model = convert_and_load(path, tmp_path / 'flax')

  name = 'vit' if kind == 'teacher' else 'irkd_vit'
  assert meta['model'] == {
      'name': name, 'kwargs': {
          'num_classes': 10, 'img_size': IMG, 'variant': 'micro', 'mean': list(CIFAR10_MEAN),
          'std': list(CIFAR10_STD), 'layer_norm_eps': 1e-12
      }
  }
  # own size, then IRKD's curriculum sizes (12 → 28 px: grids 3…7 from 8, interpolated)
  for size in (IMG, 16, 12, 28):
    x = images(size)
    err = max_diff(our_logits(model, x), hf_logits(hf, x))
    assert max(err.values()) < TOL, f'{size} px: max |Δlogits| {err}'


def test_the_students_unused_final_norm_and_pooler_are_left_out(tmp_path, capsys):
  """ViTWithDistillation's state dict holds `vit.layernorm` and `vit.pooler` (its ViTModel has
  them), which its forward never reads: they are left out, and the CLI says so."""
  hf = hf_model('student')
  sd, dropped = hf_vit_to_timm(hf.state_dict())
  assert dropped == [
      'vit.layernorm.bias', 'vit.layernorm.weight', 'vit.pooler.dense.bias',
      'vit.pooler.dense.weight'
  ]
  assert 'norm.weight' not in sd and not any(k.startswith('pooler') for k in sd)
  np.testing.assert_array_equal(sd['dist_token'].numpy(), hf.distill_token.detach().numpy())
  # q, k, v in this order in the fused qkv (timm's layout)
  qkv = sd['blocks.1.attn.qkv.weight'].numpy()
  for i, p in enumerate(('q_proj', 'k_proj', 'v_proj')):
    np.testing.assert_array_equal(qkv[32 * i:32 * (i + 1)],
                                  getattr(hf.vit.layers[1].attention, p).weight.detach().numpy())
  torch.save(hf.state_dict(), tmp_path / 'student.pth')
  from_torch.main(['--checkpoint', str(tmp_path / 'student.pth'), '--out', str(tmp_path / 'o')])
  err = capsys.readouterr().err
  assert 'ViTWithDistillation' in err and 'left out vit.layernorm.bias' in err
  assert "CIFAR-10's, as IRKD's notebooks normalise" in err


def test_the_ce_rows_vit_tiny_classifier_keeps_its_final_norm(tmp_path):
  """The notebooks' ce / cl rows use `ViTTinyClassifier`: `ViTModel(config)` (pooler included)
  + `classifier` on `last_hidden_state[:, 0]` (after vit.layernorm), which is what
  ViTForImageClassification computes: the same conversion, the unused pooler left out."""
  hf = hf_model('teacher')
  sd = dict(hf.state_dict())
  sd['vit.pooler.dense.weight'] = torch.randn(32, 32)
  sd['vit.pooler.dense.bias'] = torch.randn(32)
  save_like_the_notebooks(hf, sd, tmp_path / 'best_tiny_32px.pth', data_parallel=True)
  meta, model = convert_and_load(tmp_path / 'best_tiny_32px.pth', tmp_path / 'flax')
  assert meta['model']['name'] == 'vit'
  x = images(16)
  assert max(max_diff(our_logits(model, x), hf_logits(hf, x)).values()) < TOL


def test_the_p2_teacher_deit_for_image_classification(tmp_path):
  """Saliency_patch_size2's teacher: `DeiTForImageClassification(config=ViTConfig(…, patch_size=2))`
  (dist token with a position, final norm, one `classifier` on cls), saved through DataParallel.
  It becomes our `distilled_vit` with eval_head='cls' and a zero head_dist (it has none)."""
  from transformers import DeiTForImageClassification
  torch.manual_seed(4)
  cfg = ViTConfig(**{**CONFIG, 'patch_size': 2})
  hf = DeiTForImageClassification(config=cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  save_like_the_notebooks(hf, hf.state_dict(), tmp_path / 'best_teacher (1).pth', True)
  meta, model = convert_and_load(tmp_path / 'best_teacher (1).pth', tmp_path / 'flax')
  assert meta['model'] == {
      'name': 'distilled_vit', 'kwargs': {
          'num_classes': 10, 'img_size': IMG, 'variant': 'micro', 'patch_size': 2,
          'eval_head': 'cls', 'mean': list(CIFAR10_MEAN), 'std': list(CIFAR10_STD),
          'layer_norm_eps': 1e-12
      }
  }
  for size in (IMG, 16):
    x = images(size)
    logits = np.asarray(model(x, train=False)[0])
    want = hf_logits(hf, x)['logits']  # interpolate_pos_encoding=True below 32 px, as there
    assert float(np.std(want)) > 1e-2
    assert float(np.max(np.abs(logits - want))) < TOL, f'{size} px'


# --------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize('kind', ['teacher', 'student'])
def test_save_pretrained_folder(tmp_path, kind):
  """A `save_pretrained` folder (config.json + model.safetensors in 4.x names): the heads come
  from the config, the normalisation from a preprocessor_config.json when there is one."""
  hf = hf_model(kind, seed=3)
  folder = tmp_path / 'hf'
  hf.save_pretrained(folder)
  (folder / 'preprocessor_config.json').write_text(
      json.dumps({'image_mean': list(CIFAR10_MEAN), 'image_std': list(CIFAR10_STD)}))
  meta, model = convert_and_load(folder, tmp_path / 'flax')
  assert meta['model']['name'] == ('vit' if kind == 'teacher' else 'irkd_vit')
  for size in (IMG, 20):
    x = images(size)
    err = max_diff(our_logits(model, x), hf_logits(hf, x))
    assert max(err.values()) < TOL, f'{size} px: {err}'


# --------------------------------------------------------------------------- what differs
def test_position_embedding_resize_is_transformers_interpolation():
  """Ours (`resize_pos_embed`) against ViTEmbeddings.interpolate_pos_encoding on every IRKD
  curriculum size, patch 4 (8² → 3²…7²) and patch 2 (16² → 6²…14²): float rounding only."""
  for patch, sizes in ((4, (12, 16, 20, 24, 28)), (2, (12, 16, 20, 24, 28))):
    hf = hf_model('teacher', patch_size=patch)
    emb = hf.vit.embeddings
    table = emb.position_embeddings.detach().numpy()
    for size in sizes:
      g = size // patch
      with torch.no_grad():
        want = emb.interpolate_pos_encoding(torch.zeros(1, 1 + g * g, 32), size, size).numpy()
      got = np.asarray(resize_pos_embed(table, (g, g), num_prefix=1))
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f'patch {patch}, {size} px')


def test_transformers_default_layer_norm_eps(tmp_path):
  """The notebooks' models have transformers' default LayerNorm eps, 1e-12, which a state dict
  does not record: the converter records it (`layer_norm_eps` in the model kwargs). Forced to
  timm's 1e-6 the logits differ: each LayerNorm divides by sqrt(var + eps), its output off by
  about 5e-7 / var relative (here ~3e-5; at the notebooks' sizes with transformers' own init
  2.6e-4 for the teacher, 6.5e-4 for the ViT-Tiny student's distiller)."""
  hf = hf_model('teacher', layer_norm_eps=1e-12)
  torch.save(nn.DataParallel(hf).state_dict(), tmp_path / 'teacher.pth')
  meta, _ = convert_and_load(tmp_path / 'teacher.pth', tmp_path / 'flax')
  assert meta['model']['kwargs']['layer_norm_eps'] == 1e-12
  _, model = convert_and_load(tmp_path / 'teacher.pth', tmp_path / 'timm_eps', '--model_kwargs',
                              '{"layer_norm_eps": 1e-6}')
  x = images(IMG)
  err = max(max_diff(our_logits(model, x), hf_logits(hf, x)).values())
  assert 1e-5 < err < 2e-4, err  # measured 3.4e-5 at 32 px


def test_a_hugging_face_folder_records_its_configs_layer_norm_eps(tmp_path):
  hf = hf_model('teacher', layer_norm_eps=1e-6)
  hf.save_pretrained(tmp_path / 'folder')
  meta, model = convert_and_load(tmp_path / 'folder', tmp_path / 'flax')
  assert meta['model']['kwargs']['layer_norm_eps'] == 1e-6
  x = images(IMG)
  assert max(max_diff(our_logits(model, x), hf_logits(hf, x)).values()) < TOL


def test_transformers_default_layer_norm_eps_exactly(tmp_path):
  hf = hf_model('teacher', layer_norm_eps=1e-12)
  torch.save(hf.state_dict(), tmp_path / 'teacher.pth')
  _, model = convert_and_load(tmp_path / 'teacher.pth', tmp_path / 'flax')
  x = images(IMG)
  assert max(max_diff(our_logits(model, x), hf_logits(hf, x)).values()) < TOL


# --------------------------------------------------------------------------- refusals
def test_a_state_dict_of_no_known_layout_lists_what_it_holds(tmp_path):
  sd = {
      'module.encoder.0.weight': torch.zeros(4, 4), 'module.encoder.0.bias': torch.zeros(4),
      'module.head.weight': torch.zeros(10, 4)
  }
  torch.save(sd, tmp_path / 'other.pth')
  with pytest.raises(ValueError) as e:
    from_torch.main(['--checkpoint', str(tmp_path / 'other.pth'), '--out', str(tmp_path / 'o')])
  msg = str(e.value)
  for layout in ('CIFAR ResNet', 'timm', 'Hugging Face DeiT', 'Hugging Face ViT',
                 'ViTWithDistillation'):
    assert layout in msg, msg
  assert 'It holds 3 tensors under encoder (2), head (1)' in msg, msg


def test_a_hugging_face_vit_with_keys_we_lack_names_them(tmp_path):
  """A ViT with a mask token (ViTForMaskedImageModeling's encoder) has a key no model of ours
  holds: the error names it instead of dropping it."""
  hf = hf_model('teacher')
  sd = dict(hf.state_dict())
  sd['vit.embeddings.mask_token'] = torch.zeros(1, 1, 32)
  torch.save(sd, tmp_path / 'masked.pth')
  with pytest.raises(ValueError,
                     match=r'no counterpart in our ViT \(1\): vit.embeddings.mask_token'):
    from_torch.main(['--checkpoint', str(tmp_path / 'masked.pth'), '--out', str(tmp_path / 'o')])


def test_to_torch_offers_no_timm_load_for_another_layer_norm_eps():
  """timm's ViTs fix LayerNorm eps at 1e-6: a converted Hugging Face model (1e-12) gets the
  PyTorch twin's load lines and a comment saying why there is no timm one."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from convert.to_torch import load_instructions  # pylint: disable=g-import-not-at-top
  from convert.torch_models import timm_args  # pylint: disable=g-import-not-at-top
  from tikd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  hf_eps = build_model('vit', variant='micro', num_classes=10, layer_norm_eps=1e-12,
                       rngs=nnx.Rngs(0))
  assert timm_args(hf_eps) is None
  text = load_instructions(hf_eps, 'model.pt')
  assert 'no timm export' in text and 'eps is 1e-12' in text and 'import timm' not in text
  assert 'TorchDistilledViT' in text and "'layer_norm_eps': 1e-12" not in text
  assert 'layer_norm_eps=1e-12' in text
  timm_eps = build_model('vit', variant='micro', num_classes=10, rngs=nnx.Rngs(0))
  assert timm_args(timm_eps) is not None and 'import timm' in load_instructions(timm_eps, 'm.pt')
