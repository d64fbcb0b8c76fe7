"""`config.init_from`: a run that starts from another run's weights (fine-tuning)."""
import numpy as np
import pytest

from tests.test_resume import _checkpoint
from tests.test_train import tiny_config
from tikd_jax.models.vit import resize_pos_embed
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import trainer
from tikd_jax.tree import CheckpointMismatchError


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  """A micro ViT trained for one epoch on 16-px digits."""
  workdir = str(tmp_path_factory.mktemp('source'))
  trainer.train_and_evaluate(tiny_config('none', num_epochs=1.0), workdir)
  return workdir


def _frozen(**overrides):
  """Learning rate 0 (AdamW's decay is scaled by it too): the run ends on its initial weights."""
  return tiny_config('none', num_epochs=0.2,
                     **{'schedule.lr': 0.0, 'schedule.warmup_lr': 0.0,
                        'schedule.min_lr': 0.0}, **overrides)


def test_a_run_starts_from_the_checkpoint_with_a_resampled_grid_and_fresh_excluded_keys(
    source_run, tmp_path):
  _, source = ckpt_lib.load_weights(source_run)
  # 24-px digits: the patch grid grows from 4×4 to 6×6; the classifier starts fresh.
  grid24 = {'data.image_size': 24, 'model.img_size': 24}
  # With a model EMA (decay 0.5): it starts from the loaded weights, not the fresh ones.
  config = _frozen(**grid24, init_from=source_run, init_exclude=('^params/head/',),
                   **{'ema.decay': 0.5})
  trainer.train_and_evaluate(config, str(tmp_path / 'tuned'))
  trainer.train_and_evaluate(_frozen(**grid24), str(tmp_path / 'fresh'))
  _, tuned = ckpt_lib.load_weights(str(tmp_path / 'tuned'))
  _, fresh = ckpt_lib.load_weights(str(tmp_path / 'fresh'))
  assert tuned.keys() == source.keys()
  for key in tuned:
    if key.startswith('params/head/'):  # init_exclude: the fresh model's, not the source's
      np.testing.assert_array_equal(tuned[key], fresh[key], err_msg=key)
      assert not np.array_equal(tuned[key], source[key])
    elif key.endswith('pos_embed'):  # [1, 2 + 16, d] → [1, 2 + 36, d], cls / dist kept
      assert source[key].shape[1] == 18 and tuned[key].shape[1] == 38
      np.testing.assert_allclose(tuned[key], resize_pos_embed(source[key], (6, 6), num_prefix=2),
                                 atol=1e-6)
    else:
      np.testing.assert_array_equal(tuned[key], source[key], err_msg=key)
  # lr 0: the weights stay, and an EMA that started from them equals them (0.5·p + 0.5·p = p);
  # one that started from the fresh model would still hold 0.5^steps of it.
  extra = _checkpoint(str(tmp_path / 'tuned'))['extra']
  ema = {k[len('ema/'):]: v for k, v in extra.items() if k.startswith('ema/')}
  assert ema.keys() == tuned.keys()
  for key in tuned:
    np.testing.assert_array_equal(ema[key], tuned[key], err_msg=key)


def test_a_checkpoint_that_does_not_fit_names_every_key_and_the_remedy(source_run, tmp_path):
  config = _frozen(**{'model.variant': 'demo'}, init_from=source_run)
  with pytest.raises(CheckpointMismatchError, match=r'(?s)blocks/0/attn/qkv/kernel: checkpoint.*'
                     r'init_exclude'):
    trainer.train_and_evaluate(config, str(tmp_path / 'x'))
