"""README "Add a method", done as a user would: a term in their own file outside the package,
imported by their own config, added with one line, trained through main.py."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4

MY_TERMS = '''
"""My term: pulls a learned offset towards `target` (its parameter, trained with the student)."""
import jax.numpy as jnp

from tikd_jax.losses import register


def init(rng, shapes, **settings):
  return {'offset': jnp.zeros((), jnp.float32)}, {}


@register('my_term', init=init, no_decay=('offset',))
def my_term(ctx, target: float = 3.0):
  offset = ctx.params['offset']
  loss = jnp.square(offset - target)
  return loss, {'my_term_loss': loss, 'my_offset': offset}
'''

MY_CONFIG = '''
"""configs/tiny.py with my term added."""
import my_terms  # noqa: F401  (registers my_term)
from configs import tiny


def get_config(arg='none'):
  c = tiny.get_config(arg)
  c.extra_loss = (('my_term', 0.5),)
  return c
'''


def test_a_term_in_my_own_file_trains_from_one_config_line(tmp_path):
  (tmp_path / 'my_terms.py').write_text(textwrap.dedent(MY_TERMS))
  (tmp_path / 'my_config.py').write_text(textwrap.dedent(MY_CONFIG))
  workdir = tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=str(tmp_path),
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([
      sys.executable,
      os.path.join(REPO, 'main.py'), f'--config={tmp_path}/my_config.py', f'--workdir={workdir}',
      f'--config.stop_at_step={STEPS}', '--config.log_every_steps=1',
      '--config.xla_options=fast_compile', '--config.loss_settings.my_term.target=2'
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  rows = [r for r in rows if 'my_term_loss' in r]
  assert len(rows) == STEPS, rows
  offset = np.array([r['my_offset'] for r in rows])
  # The term computes (offset − target)², target 2 from the command line ...
  np.testing.assert_allclose([r['my_term_loss'] for r in rows], (offset - 2.0)**2, rtol=1e-5)
  # ... enters the loss at weight 0.5 beside tiny.py:none's 1.0·CE ...
  np.testing.assert_allclose([r['loss'] for r in rows],
                             [r['base_loss'] + 0.5 * r['my_term_loss'] for r in rows], rtol=1e-5)
  # ... and its parameter trains towards the target.
  assert offset[0] == 0.0 and np.all(np.diff(offset) > 0), offset
