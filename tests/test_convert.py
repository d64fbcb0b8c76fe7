"""Tests for convert/: Flax ↔ PyTorch weights for the distilled ViTs and the CIFAR ResNets.

For every model: random weights (and random BatchNorm running statistics) in Flax, converted to a
PyTorch state dict, loaded strictly into the PyTorch twin: eval logits agree to 1e-4 on the same
[0, 1] images, both heads and TIKD's fused pass included; Flax → PyTorch → Flax is bit-exact. The
CLIs run on a RepDistiller-format checkpoint, on a Hugging Face DeiT folder (through
`from_pretrained`) and on checkpoints written by `save_weights`.
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from convert import from_torch, to_torch
from convert.mapping import (check_state_dict, flax_to_torch, hf_deit_to_timm, load_strict,
                             resample_patch_embed, torch_to_flax, unwrap_state_dict)
from convert.to_torch import build_flax_model
from convert.torch_models import TorchCifarResNet, torch_model_like
from tikd_jax.models.variables import load_variables, model_variables
from tikd_jax.models.vit import SIZES
from tikd_jax.normalization import CIFAR100_MEAN
from tikd_jax.train.checkpoint import load_weights, save_weights
from tikd_jax.tree import flatten

TOL = 1e-4


# --------------------------------------------------------------------------- helpers
def random_flat(model, seed):
  """Random values for every variable: nothing left at a trivial init (zero biases, unit LN
  scales, zero-mean / unit-variance running statistics) that could hide a mapping mistake."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in flatten(model_variables(model)).items():
    shape = tuple(leaf.shape)
    if key.endswith('/scale'):
      # BatchNorm scales < 1 keep a 15-block ResNet's logits O(1) with made-up statistics
      v = rng.uniform(0.4, 0.8, shape) if 'bn' in key else 1 + 0.1 * rng.standard_normal(shape)
    elif key.endswith('/var'):
      v = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('/mean'):
      v = 0.1 * rng.standard_normal(shape)
    elif key.endswith('/kernel') and len(shape) == 4 and 'patch_embed' not in key:
      fan_out = shape[0] * shape[1] * shape[3]
      v = rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_out)  # RepDistiller's init
    elif key.endswith('/kernel'):
      v = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
    else:
      v = 0.05 * rng.standard_normal(shape, np.float32)
    flat[key] = v.astype(np.float32)
  return flat


def make_model(name, seed=0, **kwargs):
  model = build_flax_model({'name': name, 'kwargs': kwargs})
  flat = random_flat(model, seed)
  load_variables(model, flat)
  return model, flat


def flax_forward(model, x, text=None, fused=False):
  """One jitted call: eval logits, both heads, and (`fused`) TIKD's second pass with the given
  caption features and with the predicted ones."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x, text):
    m = nnx.merge(graphdef, state)
    logits, out = m(x)
    res = {'logits': logits, **{k: out[k] for k in ('cls_logits', 'dist_logits') if k in out}}
    if fused:
      res['fused'] = m(x, text=text, fuse_text=True)[0]
      res['fused_pred'] = m(x, fuse_text=True)[0]
    return res

  return {k: np.asarray(v) for k, v in run(state, x, text).items()}


def torch_forward(torch_model, images, **kwargs):
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
  with torch.no_grad():
    if hasattr(torch_model, 'forward_heads'):
      out = torch_model.forward_heads(x, **kwargs)
      return torch_model(
          x, **kwargs).numpy(), {k: v.numpy() for k, v in out.items() if k.endswith('_logits')}
    return torch_model(x).numpy(), {}


def images(n=2, size=32, seed=1):
  return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def assert_close(a, b, what):
  err = float(np.max(np.abs(a - b)))
  assert err < TOL, f'{what}: max |Δ| = {err:.3g}'
  assert float(np.std(a)) > 1e-2, f'{what}: degenerate logits'  # real numbers, not all ~0


def assert_bit_exact(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# --------------------------------------------------------------------------- logits equality
VIT_CASES = [
    # TIKD students with their text modules; the fused pass is checked on micro (text dim = width,
    # no adapter) and small (adapter 512 → 128), the first pass on every size.
    ('distilled_vit', dict(variant='micro', num_classes=10, text_dim=32)),
    ('distilled_vit', dict(variant='small', num_classes=100, text_dim=512)),
    ('distilled_vit', dict(variant='medium', num_classes=100, text_dim=512)),
    ('distilled_vit', dict(variant='large', num_classes=100, text_dim=512)),
    ('vit', dict(variant='small', num_classes=100)),
    ('irkd_vit', dict(variant='irkd_custom', num_classes=10)),
]


@pytest.mark.parametrize(
    'name,kwargs', VIT_CASES,
    ids=[f'{n}-{k["variant"]}{"-text" if "text_dim" in k else ""}' for n, k in VIT_CASES])
def test_vit_logits_and_round_trip(name, kwargs):
  model, flat = make_model(name, **kwargs)
  state_dict = flax_to_torch(flat)
  twin = load_strict(torch_model_like(model).eval(), state_dict, 'export')
  if name == 'distilled_vit':  # timm's names for the distilled ViT
    assert {
        'cls_token', 'dist_token', 'pos_embed', 'patch_embed.proj.weight', 'norm.weight',
        'blocks.0.attn.qkv.weight', 'head_dist.weight'
    } <= set(state_dict)
  if 'text_dim' in kwargs:
    assert {
        'text_decoder.weight', 'text_proj.weight', 'text_predictor.down.weight',
        'text_predictor.up.bias'
    } <= set(state_dict)
    has_adapter = kwargs['text_dim'] != SIZES[kwargs['variant']].dim  # not for large (512)
    assert ('text_adapter.down.weight' in state_dict) == has_adapter
  x = images()
  text = None
  if 'text_dim' in kwargs and kwargs['variant'] in ('micro', 'small'):
    text = np.random.default_rng(2).standard_normal((x.shape[0], kwargs['text_dim']))
    text = text.astype(np.float32)
  out = flax_forward(model, x, text, fused=text is not None)
  t_logits, t_out = torch_forward(twin, x)
  assert_close(out['logits'], t_logits, 'eval logits')
  for head in ('cls_logits', 'dist_logits'):
    if head in out:
      assert_close(out[head], t_out[head], head)
  if name == 'distilled_vit':  # eval = mean of the two heads
    np.testing.assert_allclose(t_logits, (t_out['cls_logits'] + t_out['dist_logits']) / 2,
                               atol=1e-6)
  else:  # plain and IRKD: the cls head
    assert ('dist_logits' in t_out) == (name == 'irkd_vit')
    np.testing.assert_array_equal(t_logits, t_out['cls_logits'])
  if text is not None:  # TIKD's second, text-conditioned pass: given and predicted text
    assert_close(out['fused'], torch_forward(twin, x, text=text, fuse_text=True)[0], 'fused')
    assert np.max(np.abs(out['fused'] - out['logits'])) > 1e-3  # the fused pass does something
    assert_close(out['fused_pred'], torch_forward(twin, x, fuse_text=True)[0], 'predicted text')
  if name == 'irkd_vit':  # IRKD's curriculum: lower resolution, resized position grid
    small = images(size=16)
    assert_close(flax_forward(model, small)['logits'], torch_forward(twin, small)[0], '16 px')
  assert_bit_exact(torch_to_flax(twin.state_dict()), flat)


def test_vit_dropout_rates_reach_the_torch_twin():
  """Dropout owns no weights: a model built with IRKD's rates (from checkpoint metadata, as
  to_torch does) converts strictly, its twin drops at the same places with the same rates, and
  the eval logits agree; in train mode the twin does drop."""
  model, flat = make_model('irkd_vit', variant='micro', num_classes=10, dropout=0.1,
                           attn_dropout=0.2)
  twin = load_strict(torch_model_like(model).eval(), flax_to_torch(flat), 'export')
  block = twin.blocks[1]
  assert (twin.pos_drop.p, block.attn.proj_drop.p, block.mlp.drop.p,
          block.attn.attn_drop.p) == (0.1, 0.1, 0.1, 0.2)
  x = images()
  assert_close(flax_forward(model, x)['logits'], torch_forward(twin, x)[0], 'eval logits')
  torch.manual_seed(0)
  train_logits, _ = torch_forward(twin.train(), x)
  assert np.max(np.abs(train_logits - torch_forward(twin.eval(), x)[0])) > 1e-3
  assert_bit_exact(torch_to_flax(twin.state_dict()), flat)


@pytest.mark.parametrize('arch', ['resnet8x4', 'resnet32x4'])
def test_resnet_logits_and_round_trip(arch):
  model, flat = make_model(arch, num_classes=100)
  state_dict = flax_to_torch(flat)
  assert {
      'conv1.weight', 'bn1.running_var', 'bn1.num_batches_tracked', 'layer1.0.downsample.0.weight',
      'layer1.0.downsample.1.running_mean', 'layer3.0.bn2.weight', 'fc.weight'
  } <= set(state_dict)
  twin = load_strict(torch_model_like(model).eval(), state_dict, 'export')
  np.testing.assert_array_equal(twin.layer2[0].bn1.running_var.numpy(),
                                flat['batch_stats/layer2/0/bn1/var'])
  x = images()
  assert_close(flax_forward(model, x)['logits'], torch_forward(twin, x)[0], f'{arch} logits')
  assert_bit_exact(torch_to_flax(twin.state_dict()), flat)


# --------------------------------------------------------------------------- CLIs
def _random_torch_resnet32x4(seed=0):
  torch.manual_seed(seed)
  net = TorchCifarResNet(depth=32, filters=(32, 64, 128, 256), num_classes=100)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.4, 0.8)
        m.bias.normal_(0, 0.05)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.num_batches_tracked.fill_(46920)
  return net.eval()


def test_repdistiller_checkpoint_cli(tmp_path):
  net = _random_torch_resnet32x4()
  opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
  for p in net.parameters():  # an optimizer state with momentum buffers, as RepDistiller saves
    p.grad = torch.zeros_like(p)
  opt.step()
  ckpt = tmp_path / 'ckpt_epoch_240.pth'
  torch.save(
      {
          'epoch': 240, 'model': net.state_dict(), 'accuracy': torch.tensor(79.42),
          'optimizer': opt.state_dict()
      }, ckpt)
  out = tmp_path / 'resnet32x4'
  from_torch.main([
      '--checkpoint',
      str(ckpt), '--model', 'resnet32x4', '--num_classes', '100', '--out',
      str(out)
  ])
  meta, flat = load_weights(str(out))
  assert meta['model']['name'] == 'resnet32x4'
  assert meta['model']['kwargs']['num_classes'] == 100
  assert meta['source'] == str(ckpt)
  model = build_flax_model(meta['model'])
  load_variables(model, flat)
  assert model.mean == (0.5071, 0.4865, 0.4409)
  x = images()
  assert_close(flax_forward(model, x)['logits'], torch_forward(net, x)[0], 'imported resnet32x4')
  # every value arrives unchanged (bit-exact), counters dropped
  expected = torch_to_flax(net.state_dict())
  assert_bit_exact(flat, expected)
  # the model is read off the weights, also through wrappers and DataParallel prefixes
  wrapped = {'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}}
  assert from_torch.infer_resnet(unwrap_state_dict(wrapped)) == ('resnet32x4', {'num_classes': 100})


def test_unwrap_state_dict_variants():
  sd = {'conv1.weight': torch.zeros(2), 'fc.bias': torch.ones(1)}
  for obj in (sd, {'model': sd, 'epoch': 240}, {'state_dict': sd}, {'net': sd, 'acc': 70.0},
              {f'module.{k}': v for k, v in sd.items()}):
    got = unwrap_state_dict(obj)
    assert sorted(got) == sorted(sd)
  with pytest.raises(ValueError, match='mixes tensors'):
    unwrap_state_dict({**sd, 'epoch': 240})


def test_to_torch_cli_and_round_trip(tmp_path):
  kwargs = dict(variant='micro', num_classes=10, text_dim=48)
  workdir = tmp_path / 'run'
  meta = {'model': {'name': 'distilled_vit', 'kwargs': kwargs}, 'config': {'seed': 0}}
  m1, flat1 = make_model('distilled_vit', seed=1, **kwargs)
  m2, flat2 = make_model('distilled_vit', seed=2, **kwargs)
  save_weights(str(workdir / 'checkpoints'), model_variables(m1), meta, step=100)
  save_weights(str(workdir / 'checkpoints'), model_variables(m2), meta, step=200)

  pt = to_torch.main(
      ['--workdir',
       str(workdir), '--step', '100', '--out',
       str(tmp_path / 'step100.pt')])
  sd = torch.load(pt, weights_only=True)
  twin = load_strict(torch_model_like(m1).eval(), sd, 'step 100')
  assert_bit_exact(torch_to_flax(sd), flat1)
  x = images()
  assert_close(flax_forward(m1, x)['logits'], torch_forward(twin, x)[0], 'step 100 export')

  st = to_torch.main(['--workdir', str(workdir), '--out', str(tmp_path / 'newest.safetensors')])
  from safetensors import safe_open
  with safe_open(st, framework='pt') as f:
    assert json.loads(f.metadata()[to_torch.META_KEY]) == meta['model']
    assert_bit_exact(torch_to_flax({k: f.get_tensor(k) for k in f.keys()}), flat2)

  # … and back: Flax → PyTorch → Flax is bit-exact, from the .safetensors (metadata) and from
  # the bare .pt (model read off the weights)
  for source, expected, out in ((st, flat2, 'back_st'), (pt, flat1, 'back_pt')):
    from_torch.main(['--checkpoint', source, '--out', str(tmp_path / out)])
    back_meta, back = load_weights(str(tmp_path / out))
    assert back_meta['model']['name'] == 'distilled_vit'
    assert back_meta['model']['kwargs']['variant'] == 'micro'
    assert back_meta['model']['kwargs']['text_dim'] == 48
    assert_bit_exact(back, expected)

  with pytest.raises(FileNotFoundError, match=r'steps present: \[100, 200\]'):
    to_torch.main(['--workdir', str(workdir), '--step', '7', '--out', str(tmp_path / 'x.pt')])


def test_a_bare_pt_export_says_how_to_read_back_its_normalisation(tmp_path, capsys):
  """A .pt is a bare state dict: to_torch prints the from_torch command with the model's own
  mean/std, and that command restores them exactly; without them, from_torch says it fell back
  to the default (CIFAR-100) rather than silently recording it."""
  mean, std = [0.25, 0.5, 0.125], [0.2, 0.3, 0.4]
  kwargs = dict(variant='micro', num_classes=10, mean=mean, std=std)
  workdir = tmp_path / 'run'
  model, _ = make_model('distilled_vit', seed=1, **kwargs)
  save_weights(str(workdir / 'checkpoints'), model_variables(model),
               {'model': {'name': 'distilled_vit', 'kwargs': kwargs}}, step=1)
  pt = to_torch.main(['--workdir', str(workdir), '--out', str(tmp_path / 'own.pt')])
  hint = capsys.readouterr().err
  command = hint[hint.index('python -m convert.from_torch'):hint.index(' --out DIR')].split()
  assert command[3:] == ['--checkpoint', pt, '--mean', '0.25,0.5,0.125', '--std', '0.2,0.3,0.4']
  from_torch.main(command[3:] + ['--out', str(tmp_path / 'with_flags')])
  assert 'records no input normalisation' not in capsys.readouterr().err
  back = load_weights(str(tmp_path / 'with_flags'))[0]['model']['kwargs']
  assert (back['mean'], back['std']) == (mean, std)

  from_torch.main(['--checkpoint', pt, '--out', str(tmp_path / 'without')])
  note = capsys.readouterr().err
  assert 'own.pt records no input normalisation: using the model default' in note
  back = load_weights(str(tmp_path / 'without'))[0]['model']['kwargs']
  assert back['mean'] == [float(v) for v in CIFAR100_MEAN] and repr(CIFAR100_MEAN[0]) in note


def test_hf_deit_folder(tmp_path):
  from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

  torch.manual_seed(0)
  config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, image_size=32, patch_size=4, num_labels=10,
                      hidden_act='gelu', layer_norm_eps=1e-6)
  hf = DeiTForImageClassificationWithTeacher(config).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = tmp_path / 'deit-tiny-distilled'
  hf.save_pretrained(folder)
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  (folder / 'preprocessor_config.json').write_text(
      json.dumps(
          {'image_processor_type': 'DeiTImageProcessor', 'image_mean': mean, 'image_std': std}))

  out = tmp_path / 'deit_flax'
  from_torch.main(['--checkpoint', str(folder), '--out', str(out)])
  meta, flat = load_weights(str(out))
  assert meta['model'] == {
      'name': 'distilled_vit',
      'kwargs': {
          'num_classes': 10,
          'img_size': 32,
          'variant': 'micro',
          'mean': mean,
          'std': std,
          'layer_norm_eps': 1e-6  # the folder's config.json
      }
  }
  model = build_flax_model(meta['model'])
  load_variables(model, flat)

  x = images()
  pixels = (torch.from_numpy(x).permute(0, 3, 1, 2) - torch.tensor(mean)[:, None, None]) / \
      torch.tensor(std)[:, None, None]
  with torch.no_grad():
    ref = hf(pixel_values=pixels)
  out_ = flax_forward(model, x)
  assert_close(out_['logits'], ref.logits.numpy(), 'HF DeiT logits')
  assert_close(out_['cls_logits'], ref.cls_logits.numpy(), 'HF cls head')
  assert_close(out_['dist_logits'], ref.distillation_logits.numpy(), 'HF distillation head')

  # the Hub's on-disk names (deit.encoder.layer.i.attention.attention.query, …) map the same way
  from safetensors.torch import load_file
  on_disk = load_file(folder / 'model.safetensors')
  assert any('attention.attention.query' in k for k in on_disk)
  assert_bit_exact({k: v.numpy() for k, v in hf_deit_to_timm(on_disk).items()},
                   {k: v.numpy() for k, v in hf_deit_to_timm(hf.state_dict()).items()})

  # re-gridded for IRKD's teacher: 16 px, patch 2, fresh 5-class heads
  from_torch.main([
      '--checkpoint',
      str(folder), '--img_size', '16', '--patch_size', '2', '--num_classes', '5', '--reset_heads',
      '--out',
      str(tmp_path / 'p2')
  ])
  meta, flat = load_weights(str(tmp_path / 'p2'))
  assert meta['model']['kwargs']['patch_size'] == 2
  assert flat['params/pos_embed'].shape == (1, 2 + 8 * 8, 32)
  assert flat['params/patch_embed/kernel'].shape == (2, 2, 3, 32)
  assert flat['params/head/kernel'].shape == (32, 5)
  np.testing.assert_array_equal(flat['params/pos_embed'][0, :2],
                                hf.deit.embeddings.position_embeddings[0, :2].detach().numpy())
  np.testing.assert_array_equal(flat['params/blocks/1/mlp/fc1/kernel'],
                                hf.state_dict()['deit.layers.1.mlp.fc1.weight'].numpy().T)


def test_resample_patch_embed_keeps_tokens():
  """Pseudo-inverse resize: an upsampled patch through the new kernel gives the old token."""
  torch.manual_seed(0)
  w = torch.randn(8, 3, 4, 4)
  w8 = resample_patch_embed(w, 8)
  patch = torch.rand(5, 3, 4, 4)
  up = torch.nn.functional.interpolate(patch.double(), size=(8, 8), mode='bicubic', antialias=True,
                                       align_corners=False).float()
  old = torch.einsum('ochw,nchw->no', w, patch)
  new = torch.einsum('ochw,nchw->no', w8, up)
  torch.testing.assert_close(new, old, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- mismatches
def test_mismatched_keys_are_listed(tmp_path):
  net = _random_torch_resnet32x4()
  sd = dict(net.state_dict())
  del sd['layer2.1.bn1.weight']
  sd['layer4.0.conv1.weight'] = torch.zeros(1)
  sd['fc.weight'] = torch.zeros(10, 256)
  bad = tmp_path / 'bad.pth'
  torch.save({'model': sd, 'epoch': 240}, bad)
  with pytest.raises(ValueError) as e:
    from_torch.main([
        '--checkpoint',
        str(bad), '--model', 'resnet32x4', '--num_classes', '100', '--out',
        str(tmp_path / 'x')
    ])
  msg = str(e.value)
  assert 'missing keys (1): layer2.1.bn1.weight' in msg
  assert 'unexpected keys (1): layer4.0.conv1.weight' in msg
  assert 'fc.weight: checkpoint (10, 256) vs model (100, 256)' in msg

  with pytest.raises(ValueError, match='--model resnet8x4 but the checkpoint is a resnet32x4'):
    from_torch.main(
        ['--checkpoint',
         str(bad), '--model', 'resnet8x4', '--out',
         str(tmp_path / 'y')])

  # the Flax side: a checkpoint that does not fit its own metadata
  model, flat = make_model('vit', variant='micro', num_classes=10)
  flat = dict(flat)
  flat.pop('params/head/bias')
  flat['params/head_dist/kernel'] = np.zeros((32, 10), np.float32)
  with pytest.raises(ValueError) as e:
    to_torch.export(flat, {'name': 'vit', 'kwargs': {'variant': 'micro', 'num_classes': 10}})
  assert 'missing keys (1): params/head/bias' in str(e.value)
  assert 'unexpected keys (1): params/head_dist/kernel' in str(e.value)

  # and the PyTorch side of an export
  twin = torch_model_like(model)
  sd = flax_to_torch(make_model('vit', variant='micro', num_classes=10)[1])
  sd['pos_embed'] = torch.zeros(1, 5, 32)
  with pytest.raises(ValueError, match=r'pos_embed: checkpoint \(1, 5, 32\) vs model \(1, 65,'):
    load_strict(twin, sd, 'export')
  with pytest.raises(ValueError, match='missing keys'):
    check_state_dict({'a': np.zeros(1)}, {}, 'x')

  # a ViT file imported as the wrong size
  torch.save(flax_to_torch(make_model('vit', variant='micro', num_classes=10)[1]),
             tmp_path / 'micro.pt')
  with pytest.raises(ValueError) as e:
    from_torch.main([
        '--checkpoint',
        str(tmp_path / 'micro.pt'), '--variant', 'demo', '--out',
        str(tmp_path / 'z')
    ])
  assert 'missing keys (24): blocks.2.norm1.weight' in str(e.value)
  assert 'cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)' in str(e.value)


# --------------------------------------------------------------------------- the printed load call
def _printed(capsys, workdir, out) -> str:
  to_torch.main(['--workdir', str(workdir), '--out', str(out)])
  return capsys.readouterr().out


@pytest.mark.parametrize('name,kwargs,timm_class', [
    ('distilled_vit', dict(variant='demo', img_size=16, num_classes=10,
                           mean=(0.3, 0.4, 0.5)), 'timm.models.deit.VisionTransformerDistilled'),
    ('vit', dict(variant='micro',
                 num_classes=5), 'timm.models.vision_transformer.VisionTransformer'),
    ('distilled_vit', dict(variant='micro', num_classes=10, text_dim=48), None),
    ('irkd_vit', dict(variant='micro', num_classes=10), None),
    ('resnet8', dict(num_classes=3), None),
])
def test_to_torch_prints_the_strict_load_calls(tmp_path, capsys, name, kwargs, timm_class):
  """The timm call's arguments are those of the written state dict (token count and grid from
  pos_embed, patch and width from the patch kernel, depth from the blocks, MLP width, classes);
  the twin's printed lines, run as printed, load the file strictly and give our logits."""
  model, flat = make_model(name, seed=3, **kwargs)
  save_weights(str(tmp_path / 'run'), model_variables(model),
               {'model': {'name': name, 'kwargs': kwargs}})
  out = tmp_path / 'exported.pt'
  text = _printed(capsys, tmp_path / 'run', out)
  sd = torch.load(out, weights_only=True)
  twin_lines = text[text.index("# this repository's PyTorch twin"):]
  if timm_class is None:
    assert 'timm' not in text
  else:
    call = re.search(r'^model = ' + re.escape(timm_class) + r'\((.*)\)$', text, re.M)
    assert call, text
    args = eval(f'dict({call.group(1)})')  # pylint: disable=eval-used
    dim, patch = args['embed_dim'], args['patch_size']
    assert tuple(sd['patch_embed.proj.weight'].shape) == (dim, 3, patch, patch)
    prefix = 2 if 'dist_token' in sd else 1
    assert tuple(sd['pos_embed'].shape) == (1, (args['img_size'] // patch)**2 + prefix, dim)
    assert args['depth'] == 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    assert sd['blocks.0.mlp.fc1.weight'].shape[0] == int(dim * args['mlp_ratio'])
    assert sd['head.weight'].shape[0] == args['num_classes'] == kwargs['num_classes']
    assert args['num_heads'] == model.size.heads
    assert f"model.load_state_dict(torch.load('{out}'), strict=True)" in text
    assert f'mean={tuple(float(v) for v in model.mean)}' in text  # timm does not normalise
  namespace = {}
  exec(twin_lines, namespace)  # pylint: disable=exec-used
  twin = namespace['model'].eval()
  x = images(size=kwargs.get('img_size', 32))
  assert_close(flax_forward(model, x)['logits'], torch_forward(twin, x)[0], f'printed {name}')


def test_printed_timm_call_loads_strictly_in_timm(tmp_path, capsys):
  """Where timm is installed (it is not in requirements.txt): the printed lines run as printed."""
  pytest.importorskip('timm')
  kwargs = dict(variant='demo', img_size=16, num_classes=10)
  model, _ = make_model('distilled_vit', seed=4, **kwargs)
  save_weights(str(tmp_path / 'run'), model_variables(model),
               {'model': {'name': 'distilled_vit', 'kwargs': kwargs}})
  text = _printed(capsys, tmp_path / 'run', tmp_path / 'exported.safetensors')
  namespace = {}
  exec(text[:text.index("# this repository's PyTorch twin")], namespace)  # pylint: disable=exec-used
  x = images(size=16)
  mean, std = np.asarray(model.mean, np.float32), np.asarray(model.std, np.float32)
  with torch.no_grad():
    logits = namespace['model'].eval()(torch.from_numpy(((x - mean) / std).transpose(0, 3, 1, 2)))
  assert_close(flax_forward(model, x)['logits'], logits.numpy(), 'timm')


@pytest.mark.parametrize('command,flags', [
    ('convert.to_torch', ['--workdir', '{tmp}/no_run', '--out', '{tmp}/x.pt']),
    ('convert.from_torch', ['--checkpoint', '{tmp}/no_file.pth', '--out', '{tmp}/x']),
])
def test_a_missing_input_is_one_error_line(tmp_path, command, flags):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-m', command] + [f.format(tmp=tmp_path) for f in flags],
                        cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stderr
  assert 'Traceback' not in done.stderr
  assert done.stderr.strip().startswith('error:') and 'does not exist' in done.stderr
