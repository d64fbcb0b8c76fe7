"""tikd_jax.visualize: the maps against hand re-statements, the metrics reader, and every command
end to end on tiny workdirs (a micro ViT and a resnet8 on 16-px digits, weights-only checkpoints).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tikd_jax.models.variables import abstract_model
from tikd_jax.train.checkpoint import save_weights
from tikd_jax.visualize import main, maps
from tikd_jax.visualize.workdir import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = [0.3] * 3, [0.3] * 3
# configs/common.py base().data, with digits at 16 px.
DATA = dict(name='digits', dir='', download=False, tfds_name='', image_size=16, val_size=0,
            val_seed=42, num_workers=0, crop_padding=4, flip=True, train_split='train',
            eval_split='test')
SPECS = {
    'vit': ('distilled_vit', dict(variant='micro', img_size=16, num_classes=10, mean=MEAN,
                                  std=STD)),
    'resnet': ('resnet8', dict(num_classes=10, mean=MEAN, std=STD)),
}
# train rows: step 20 is logged twice (a resume from the step-10 checkpoint): the last one wins.
METRICS = [
    {'step': 10, 'kind': 'train', 'loss': 2.30, 'train_top1': 0.10},
    {'step': 20, 'kind': 'train', 'loss': 9.99, 'train_top1': 0.05},
    {'step': 20, 'kind': 'eval', 'loss': 9.00, 'top1': 1.0, 'top5': 2.0},
    {'step': 20, 'kind': 'train', 'loss': 2.00, 'train_top1': 0.30},
    {'step': 20, 'kind': 'eval', 'loss': 1.90, 'top1': 40.0, 'top5': 85.0},
    {'step': 30, 'kind': 'train', 'loss': 1.50, 'train_top1': 0.50},
    {'step': 30, 'kind': 'eval', 'loss': 1.40, 'top1': 55.0, 'top5': 93.0},
]


def _random_model(name, kwargs, seed):
  """(graphdef, variables) drawn with NumPy: no initializer programs to compile (an eager
  build_model costs ~20 s of XLA compiles on a busy 2-core machine). Kernels N(0, 1/fan_in),
  norm scales 1 + N(0, 0.1²), biases and BN means N(0, 0.1²), BN variances 1 + |N(0, 0.1²)|,
  tokens and position embeddings N(0, 0.5²): far from uniform attention."""
  graphdef, template = abstract_model(name, **kwargs)
  rs = np.random.RandomState(seed)

  def fill(path, x):
    leaf = str(path[-1].key)
    if leaf == 'kernel':
      value = rs.randn(*x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif leaf == 'scale':
      value = 1.0 + 0.1 * rs.randn(*x.shape)
    elif leaf in ('bias', 'mean'):
      value = 0.1 * rs.randn(*x.shape)
    elif leaf == 'var':
      value = 1.0 + np.abs(0.1 * rs.randn(*x.shape))
    else:
      value = 0.5 * rs.randn(*x.shape)
    return np.asarray(value, x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, template)


def _make_workdir(root, which, metrics=True):
  name, kwargs = SPECS[which]
  graphdef, variables = _random_model(name, kwargs, seed=0)
  workdir = os.path.join(root, which)
  save_weights(os.path.join(workdir, 'checkpoints'), variables,
               {'step': 30, 'model': {'name': name, 'kwargs': kwargs}}, step=30)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(
        {
            'name': f'test_{which}', 'data': DATA, 'model': dict(kwargs, name=name),
            'tikd': {'eval_text': 'predicted'}
        }, f)
  if metrics:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in METRICS)
  return workdir


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('visualize'))
  return {which: _make_workdir(root, which) for which in SPECS}


def _check_png(path, min_side=150, max_side=3000):
  assert os.path.isfile(path) and os.path.getsize(path) > 1000, path
  with Image.open(path) as im:
    im.load()
    assert im.format == 'PNG'
    w, h = im.size
    pixels = np.asarray(im.convert('RGB'), np.float32)
  assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
  assert pixels.std() > 5.0, pixels.std()  # not blank
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # more than text on white
  return w, h


# ------------------------------------------------------------------------------------- maps
def test_grad_cam_hand_computed():
  a = np.zeros((1, 2, 2, 2), np.float32)
  a[0, :, :, 0] = [[1, 2], [3, 4]]
  a[0, :, :, 1] = [[4, 0], [0, -8]]
  g = np.zeros_like(a)
  g[0, :, :, 0] = [[0.5, 0.5], [1.0, 0.0]]  # mean 0.5
  g[0, :, :, 1] = [[-1.0, 0.0], [0.0, 0.0]]  # mean -0.25
  # 0.5·A0 − 0.25·A1 = [[-0.5, 1], [1.5, 4]] → ReLU → / 4
  np.testing.assert_allclose(maps.grad_cam(a, g)[0], [[0.0, 0.25], [0.375, 1.0]], atol=1e-7)
  # no positive evidence: the map stays zero instead of dividing by zero
  np.testing.assert_array_equal(maps.grad_cam(a, -np.abs(g) * (a > 0)), 0.0)


def test_grad_cam_matches_numpy_restatement():
  rs = np.random.RandomState(0)
  a = rs.randn(3, 4, 5, 6).astype(np.float32)
  g = rs.randn(3, 4, 5, 6).astype(np.float32)
  cam = np.asarray(maps.grad_cam(a, g))
  expected = np.zeros((3, 4, 5))
  for b in range(3):
    w = g[b].mean(axis=(0, 1))
    m = np.maximum(sum(w[c] * a[b, :, :, c] for c in range(6)), 0.0)
    expected[b] = m / m.max()
  np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)
  assert cam.min() >= 0.0 and np.allclose(cam.max(axis=(1, 2)), 1.0)
  assert (cam == 0).any()  # the ReLU clipped something


def test_stage_gradients_go_through_the_model():
  """resnet8: logits = fc(mean_ij A), so ∂y_k/∂A[i, j, c] = W[c, k] / (h·w) everywhere."""
  graphdef, variables = _random_model('resnet8', SPECS['resnet'][1], seed=1)
  images = np.random.RandomState(0).rand(3, 16, 16, 3).astype(np.float32)
  ref_logits, ref_out = jax.jit(lambda v, x: nnx.merge(graphdef, v['params'], v['batch_stats'])(x))(
      variables, images)
  logits, acts, grads = maps.stage_gradients(graphdef, variables, images, 'layer3')
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)  # the probe is a zero
  np.testing.assert_allclose(acts, ref_out['layer3'], rtol=1e-5, atol=1e-5)
  assert acts.shape == (3, 4, 4, 64)
  pred = np.argmax(np.asarray(ref_logits), -1)
  kernel = variables['params']['fc']['kernel']  # [64, 10]
  expected = np.broadcast_to(kernel[:, pred].T[:, None, None, :] / 16.0, acts.shape)
  np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-7)
  # an explicit class instead of the prediction
  _, _, grads2 = maps.stage_gradients(graphdef, variables, images, 'layer3',
                                      classes=jnp.array([7, 7, 7]))
  np.testing.assert_allclose(grads2[:, 0, 0], np.tile(kernel[:, 7] / 16.0, (3, 1)), rtol=1e-5)
  cam = np.asarray(maps.grad_cam(acts, grads))
  assert cam.shape == (3, 4, 4) and cam.min() >= 0 and cam.max() <= 1.0 + 1e-6


def _vit_grad_cam_restated(graphdef, variables, images, block, classes, head):
  """ViT Grad-CAM by another route: the blocks run by hand up to `block`, A = its norm1 output,
  and jax.grad of the rest of the forward (the pre-LN block formula x + Attn(A),
  x + MLP(LN₂(x)), the later blocks, the final norm, the heads) w.r.t. A; then the map in NumPy
  over the patch tokens only. `head` picks the differentiated logits: 'mean' of cls and dist
  (the documented eval logits of a distilled ViT) or 'cls'."""
  model = nnx.merge(graphdef, variables['params'], variables['batch_stats'])
  x = model.embed(jnp.asarray(images))
  for blk in model.blocks[:block]:
    x, _ = blk(x)
  a = model.blocks[block].norm1(x)

  def logits_of(a):
    blk = model.blocks[block]
    h = x + blk.attn(a)[0]
    h = h + blk.mlp(blk.norm2(h))
    for later in model.blocks[block + 1:]:
      h, _ = later(h)
    h = model.norm(h)
    cls = model.head(h[:, 0])
    if head == 'cls':
      return cls
    return (cls + model.head_dist(h[:, 1])) / 2

  def selected(a):
    return jnp.sum(jnp.take_along_axis(logits_of(a), classes[:, None], axis=1))

  logits = np.asarray(logits_of(a))
  grads = np.asarray(jax.grad(selected)(a))
  a = np.asarray(a)
  p, g = model.num_prefix, model.grid
  expected = np.zeros((len(images), g, g))
  for b in range(len(images)):
    w = grads[b, p:].mean(axis=0)  # [d]: mean over the patch tokens
    cam = np.maximum(a[b, p:] @ w, 0.0).reshape(g, g)
    expected[b] = cam / cam.max() if cam.max() > 0 else cam
  return logits, a, grads, expected


@pytest.mark.parametrize('distilled', [True, False])
def test_vit_grad_cam_matches_restatement(distilled):
  name, kwargs = SPECS['vit']
  kwargs = dict(kwargs, distilled=distilled)
  graphdef, variables = _random_model(name, kwargs, seed=2)
  images = np.random.RandomState(1).rand(4, 16, 16, 3).astype(np.float32)
  prefix = 2 if distilled else 1
  logits, acts, grads = maps.vit_token_gradients(graphdef, variables, images)
  assert acts.shape == grads.shape == (4, prefix + 16, 32)
  heat = np.asarray(maps.vit_grad_cam(acts, grads, prefix))
  assert heat.shape == (4, 4, 4)  # [B, grid, grid]
  # the probe is a zero: the logits are the model's own eval logits
  ref_logits, out = jax.jit(lambda v, x: nnx.merge(graphdef, v['params'], v['batch_stats'])(x))(
      variables, images)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  if distilled:  # the documented logits: the mean of the two heads
    np.testing.assert_allclose(logits, (out['cls_logits'] + out['dist_logits']) / 2, rtol=1e-5,
                               atol=1e-5)
  pred = np.argmax(np.asarray(ref_logits), -1)
  ref_logits2, ref_acts, ref_grads, expected = _vit_grad_cam_restated(
      graphdef, variables, images, 1, jnp.asarray(pred), 'mean' if distilled else 'cls')
  np.testing.assert_allclose(ref_logits2, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(acts, ref_acts, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads, ref_grads, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(heat, expected, rtol=1e-4, atol=1e-5)
  peaks = heat.max(axis=(1, 2))  # 1, or 0 where nothing is positive evidence
  assert heat.min() >= 0.0 and np.all(np.isclose(peaks, 1.0) | (peaks == 0.0)) and peaks.any()
  # the first block instead of the last, and an explicit class instead of the prediction
  other = (pred + 1) % 10
  _, acts0, grads0 = maps.vit_token_gradients(graphdef, variables, images, block=0,
                                              classes=jnp.asarray(other))
  *_, expected0 = _vit_grad_cam_restated(graphdef, variables, images, 0, jnp.asarray(other),
                                         'mean' if distilled else 'cls')
  np.testing.assert_allclose(maps.vit_grad_cam(acts0, grads0, prefix), expected0, rtol=1e-4,
                             atol=1e-5)


def test_vit_grad_cam_uses_the_prediction_and_mean_logits():
  """The default class is the prediction, and a distilled ViT's map is not the cls head's."""
  graphdef, variables = _random_model(*SPECS['vit'], seed=2)
  images = np.random.RandomState(1).rand(4, 16, 16, 3).astype(np.float32)
  logits, acts, grads = maps.vit_token_gradients(graphdef, variables, images)
  pred = jnp.argmax(logits, -1)
  _, _, grads_pred = maps.vit_token_gradients(graphdef, variables, images, classes=pred)
  np.testing.assert_allclose(grads, grads_pred, rtol=1e-6, atol=1e-9)
  _, _, grads_other = maps.vit_token_gradients(graphdef, variables, images, classes=(pred + 1) % 10)
  assert not np.allclose(grads, grads_other, atol=1e-6)
  *_, cls_grads, _ = _vit_grad_cam_restated(graphdef, variables, images, 1, pred, 'cls')
  assert not np.allclose(grads, cls_grads, rtol=1e-2, atol=1e-4)
  with pytest.raises(ValueError, match='block 2 out of range'):
    maps.vit_token_gradients(graphdef, variables, images, block=2)


def _random_attention(rs, b, h, t):
  logits = rs.randn(b, h, t, t) * 2
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_attention_rollout_matches_numpy_restatement():
  rs = np.random.RandomState(0)
  prefix, grid = 2, 3
  attns = [_random_attention(rs, 2, 4, prefix + grid * grid) for _ in range(3)]
  rollout = np.eye(attns[0].shape[-1])[None]
  for a in attns:
    a_hat = 0.5 * a.mean(1) + 0.5 * np.eye(a.shape[-1])
    a_hat /= a_hat.sum(-1, keepdims=True)
    rollout = a_hat @ rollout
  row = rollout[:, 0, prefix:].reshape(2, grid, grid)
  lo, hi = row.min((1, 2), keepdims=True), row.max((1, 2), keepdims=True)
  got = np.asarray(maps.attention_rollout(attns, prefix))
  np.testing.assert_allclose(got, (row - lo) / (hi - lo + 1e-8), rtol=1e-5, atol=1e-6)
  assert got.min() == 0.0 and np.allclose(got.max((1, 2)), 1.0, atol=1e-6)
  # one block: the identity only adds to the cls column, so rollout = last-layer attention
  np.testing.assert_allclose(maps.attention_rollout(attns[-1:], prefix),
                             maps.last_layer_attention(attns, prefix), atol=1e-6)
  with pytest.raises(ValueError, match='do not fill a 3x3 grid'):
    maps.attention_rollout(attns, 1, grid=3)


def test_upsample_keeps_range():
  m = jnp.asarray(np.random.RandomState(0).rand(2, 4, 4), jnp.float32)
  up = np.asarray(maps.upsample(m, (16, 16)))
  assert up.shape == (2, 16, 16)
  assert up.min() >= float(m.min()) - 1e-6 and up.max() <= float(m.max()) + 1e-6


# ---------------------------------------------------------------------------------- metrics
def test_read_metrics_last_row_per_step_wins(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in METRICS)
    f.write('{"step": 40, "kind": "tra')  # the half-written line of a killed run
  m = read_metrics(str(tmp_path))
  assert [r['step'] for r in m.train] == [10, 20, 30]
  assert [r['loss'] for r in m.train] == [2.30, 2.00, 1.50]
  assert [(r['step'], r['top1'], r['top5']) for r in m.eval] == [(20, 40.0, 85.0), (30, 55.0, 93.0)]
  assert m.resumes == [20] and m.skipped_lines == 1


# --------------------------------------------------------------------------------- commands
def _command(name, workdir, out, num_images, *flags):
  return main(
      [name, '--workdir', workdir, '--out',
       str(out), '--num_images',
       str(num_images), *flags])


def test_attention_vit(workdirs, tmp_path):
  path = _command('attention', workdirs['vit'], tmp_path, 8)
  assert path == str(tmp_path / 'attention.png')
  w, h = _check_png(path, min_side=300)
  assert w > h  # 4 columns × 2 rows
  _check_png(_command('attention', workdirs['vit'], tmp_path / 'last', 3, '--attention', 'last'))


def test_attention_resnet_grad_cam(workdirs, tmp_path, capsys):
  path = main([
      'attention', '--workdir', workdirs['resnet'], '--out',
      str(tmp_path), '--num_images', '6', '--split', 'train'
  ])
  assert capsys.readouterr().out.strip() == path  # prints the path it wrote
  _check_png(path, min_side=300)


def test_gradcam_command(workdirs, tmp_path, capsys):
  for which in ('vit', 'resnet'):
    path = _command('gradcam', workdirs[which], tmp_path / which, 8)
    assert path == str(tmp_path / which / 'gradcam.png')
    assert capsys.readouterr().out.strip() == path
    w, h = _check_png(path, min_side=300)
    assert w > h  # 4 columns × 2 rows
  _check_png(_command('gradcam', workdirs['vit'], tmp_path / 'first', 3, '--block', '0'))
  with pytest.raises(SystemExit, match='--block 5 is out of range'):
    main(['gradcam', '--workdir', workdirs['vit'], '--out', str(tmp_path), '--block', '5'])


def test_tsne(workdirs, tmp_path):
  path = main([
      'tsne', '--workdir', workdirs['vit'], '--out',
      str(tmp_path), '--max_points', '120', '--batch_size', '64'
  ])
  w, h = _check_png(path, min_side=400)
  assert w > h  # the legend sits right of the scatter


def test_curves_through_python_m(workdirs, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run([
      sys.executable, '-m', 'tikd_jax.visualize', 'curves', '--workdir', workdirs['vit'], '--out',
      str(tmp_path)
  ], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(tmp_path / 'curves.png')
  w, h = _check_png(proc.stdout.strip())
  assert w > 2 * h  # two panels side by side


def test_curves_without_eval_rows_and_default_out(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in METRICS if r['kind'] == 'train')
  path = main(['curves', '--workdir', str(tmp_path)])
  assert path == str(tmp_path / 'plots' / 'curves.png')
  _check_png(path)


def test_errors_say_what_to_do(workdirs, tmp_path):
  with pytest.raises(SystemExit, match='no checkpoint in .*train first'):
    main(['attention', '--workdir', str(tmp_path)])
  with pytest.raises(SystemExit, match='does not exist'):
    main(['tsne', '--workdir', str(tmp_path / 'nowhere')])
  with pytest.raises(SystemExit, match='metrics.jsonl not found'):
    main(['curves', '--workdir', str(tmp_path)])
  root = tmp_path / 'no_config'
  workdir = _make_workdir(str(root), 'resnet', metrics=False)
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(SystemExit, match='config.json not found'):
    main(['tsne', '--workdir', workdir])
