"""Image captioners from transformers checkpoints (a local folder or a hub id).

Two kinds (`--kind`, `auto` reads config.json):
  minicpm   MiniCPM-V (2.6) through its own `chat` (AutoModel, trust_remote_code): batched as a
            list of conversations `[[{'role': 'user', 'content': [image, prompt]}], ...]`.
            Its remote code was written for transformers 4.40 and torch 2.1; `load_minicpm` makes
            it load and compute the same under our pins (see there).
  generate  any image-to-text model with `generate()`: AutoProcessor + AutoModelForImageTextToText
            (AutoModelForVision2Seq on transformers 4): BLIP, GIT, LLaVA-style chat models (their
            chat template is applied when the processor has one). Echoed prompts are removed.

A captioner is a callable `(images: list[PIL.Image], prompt: str) -> list[str]`.
"""
from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import sys
import typing
import warnings
from typing import Callable

from tikd_jax.text_teacher.files import TextTeacherError

log = logging.getLogger('tikd_jax.text_teacher')

KINDS = ('auto', 'minicpm', 'generate')
DEFAULT_PROMPTS = {
    'minicpm': 'Describe the main object of this image in one short sentence.',
    'generate': '',  # BLIP-style captioners caption best unconditioned
}
Captioner = Callable[[list, str], list]


def read_config(model: str) -> dict:
  """config.json of a local folder or hub id (no remote code runs)."""
  if os.path.isdir(model):
    path = os.path.join(model, 'config.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{model} has no config.json: not a transformers model folder')
  else:
    from transformers.utils import cached_file  # pylint: disable=g-import-not-at-top
    path = cached_file(model, 'config.json')
  with open(path) as f:
    return json.load(f)


def resolve_kind(model: str, kind: str = 'auto') -> str:
  if kind not in KINDS:
    raise ValueError(f'--kind must be one of {KINDS}, got {kind!r}')
  if kind != 'auto':
    return kind
  config = read_config(model)
  names = [config.get('model_type', '')] + list(config.get('architectures') or [])
  return 'minicpm' if any('minicpm' in str(n).lower() for n in names) else 'generate'


def resolve_device(device: str) -> str:
  import torch  # pylint: disable=g-import-not-at-top
  if device == 'auto':
    return 'cuda' if torch.cuda.is_available() else 'cpu'
  if device.startswith('cuda') and not torch.cuda.is_available():
    raise RuntimeError(f'--device {device} but torch sees no CUDA device')
  return device


def torch_dtype(dtype: str, device: str):
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == 'auto':
    return torch.bfloat16 if device.startswith('cuda') else torch.float32
  return {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}[dtype]


def quiet_progress_bars() -> None:
  """No per-file weight-loading bars in logs (kept on a terminal)."""
  if not sys.stderr.isatty():
    from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
    hf_logging.disable_progress_bar()


def _clean(text: str) -> str:
  return ' '.join(str(text).split())


class MiniCPMCaptioner:
  """MiniCPM-V 2.6 `model.chat(image=None, msgs=..., tokenizer=...)` as on its model card."""

  def __init__(self, model, tokenizer, *, max_new_tokens: int, sampling: bool):
    self.model, self.tokenizer = model, tokenizer
    self.max_new_tokens, self.sampling = max_new_tokens, sampling
    self.batched = True

  def _chat(self, msgs):
    with _quiet_remote_code():
      return self.model.chat(image=None, msgs=msgs, tokenizer=self.tokenizer,
                             sampling=self.sampling, max_new_tokens=self.max_new_tokens)

  def __call__(self, images: list, prompt: str) -> list[str]:
    conversations = [[{'role': 'user', 'content': [image, prompt]}] for image in images]
    if self.batched and len(conversations) > 1:
      try:
        answers = self._chat(conversations)  # a list of conversations → a list of answers
        if isinstance(answers, (list, tuple)) and len(answers) == len(conversations):
          return [_clean(a) for a in answers]
        raise TypeError(f'batched chat returned {type(answers).__name__}')
      except (AssertionError, TypeError, KeyError, AttributeError, IndexError) as e:
        log.warning(
            'this MiniCPM-V remote code does not batch (%s: %s); captioning one image '
            'at a time',
            type(e).__name__, e)
        self.batched = False
    return [_clean(self._chat(conversation)) for conversation in conversations]


# Names `from torch.nn.functional import *` gave before torch made its typing imports private.
_TORCH_TYPING_NAMES = ('Callable', 'List', 'Optional', 'Tuple', 'Union')
# Library messages about the remote code that a user can do nothing about.
_REMOTE_CODE_NOISE = ("defines `image_processor_class = 'AutoImageProcessor'`",
                      '`use_return_dict` is deprecated')


@contextlib.contextmanager
def _torch_typing_names_as_builtins():
  """MiniCPM-V's resampler.py annotates with `List` that it only got from `from
  torch.nn.functional import *`; on torch 2.13 its import fails (`NameError: name 'List' is not
  defined`). The names are lent as builtins while the remote code is imported, then taken back."""
  lent = [n for n in _TORCH_TYPING_NAMES if not hasattr(builtins, n)]
  for name in lent:
    setattr(builtins, name, getattr(typing, name))
  try:
    yield
  finally:
    for name in lent:
      delattr(builtins, name)


class _DropMessages(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(m in record.getMessage() for m in _REMOTE_CODE_NOISE)


@contextlib.contextmanager
def _quiet_remote_code():
  """Drops the library warnings that MiniCPM-V's remote code triggers on every run: those in
  _REMOTE_CODE_NOISE, generate()'s note that the repetition penalty skips the prompt (so it did
  under transformers 4.40) and the deprecation of the attention-mask helper its vision tower
  imports. Every other warning still shows."""
  drop = _DropMessages()
  loggers = [
      logging.getLogger(n)
      for n in ('transformers.processing_utils', 'transformers.configuration_utils')
  ]
  for logger in loggers:
    logger.addFilter(drop)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='Passing `repetition_penalty` with `inputs_embeds`')
      warnings.filterwarnings('ignore', message='The attention mask API under',
                              category=FutureWarning)
      yield
  finally:
    for logger in loggers:
      logger.removeFilter(drop)


def _transformers_major() -> int:
  import transformers  # pylint: disable=g-import-not-at-top
  return int(transformers.__version__.split('.')[0])


def _with_post_init(cls):
  """transformers 5 needs every model's __init__ to end in `post_init()` (from_pretrained reads
  what it sets: `AttributeError: 'MiniCPMV' object has no attribute 'all_tied_weights_keys'`);
  MiniCPM-V's does not call it. A subclass that does, when the remote class did not."""

  class WithPostInit(cls):

    def __init__(self, config, *args, **kwargs):
      super().__init__(config, *args, **kwargs)
      if not hasattr(self, 'all_tied_weights_keys'):
        self.post_init()

  WithPostInit.__name__ = WithPostInit.__qualname__ = cls.__name__
  return WithPostInit


def _restore_resampler_positions(net, device: str) -> None:
  """transformers 5 builds the model on the meta device and leaves non-persistent buffers that no
  `_init_weights` knows uninitialised: MiniCPM-V's resampler position table (`pos_embed`, 2D
  sin-cos, computed in its __init__) came back all zeros, and captions silently changed. It is
  recomputed by the remote code's own method."""
  resampler = getattr(net, 'resampler', None)
  if hasattr(resampler, '_set_2d_pos_cache'):
    resampler._set_2d_pos_cache(resampler.max_size, device)  # pylint: disable=protected-access


def _explain_torchvision(error: BaseException) -> TextTeacherError | None:
  """MiniCPM-V's remote code imports torchvision (and uses none of it): a missing one, or one
  built for another torch (`operator torchvision::nms does not exist`), stops the load."""
  if 'torchvision' not in f'{type(error).__name__}: {error}':
    return None
  import torch  # pylint: disable=g-import-not-at-top
  major, minor = (int(x) for x in torch.__version__.split('+')[0].split('.')[:2])
  vision = f'torchvision 0.{minor + 15}.*' if major == 2 else 'the torchvision'
  cpu = ', its CPU build like this torch' if '+cpu' in torch.__version__ else ''
  return TextTeacherError(
      f'MiniCPM-V\'s remote code imports torchvision (and uses none of it), which does not '
      f'import here. Install {vision} made for torch {torch.__version__}{cpu}; not the newest, '
      f'which needs another torch. The import said: {error}')


def load_minicpm(model: str, device: str, dtype, *, max_new_tokens: int,
                 sampling: bool) -> MiniCPMCaptioner:
  """AutoModel + AutoTokenizer from the checkpoint's remote code, made to work under our pins.

  MiniCPM-V 2.6's code targets transformers 4.40 / torch 2.1. Under transformers 5 and torch 2.13:
  its `List` annotations (_torch_typing_names_as_builtins), its missing `post_init`
  (_with_post_init) and its zeroed resampler positions (_restore_resampler_positions) are fixed
  here; the captions of a tiny random MiniCPM-V 2.6 then equal those under transformers 4.40.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  local = os.path.isdir(model)
  v5 = _transformers_major() >= 5
  with _torch_typing_names_as_builtins(), _quiet_remote_code():
    try:
      config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=True,
                                                       local_files_only=local)
      remote = (getattr(config, 'auto_map', None) or {}).get('AutoModel')
      kwargs = dict(config=config, attn_implementation='sdpa', local_files_only=local,
                    **{'dtype' if v5 else 'torch_dtype': dtype})
      if v5 and remote:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module  # pylint: disable=g-import-not-at-top
        cls = get_class_from_dynamic_module(remote, model, local_files_only=local)
        net = _with_post_init(cls).from_pretrained(model, **kwargs)
      else:
        net = transformers.AutoModel.from_pretrained(model, trust_remote_code=True, **kwargs)
    except (ImportError, RuntimeError) as e:
      explained = _explain_torchvision(e)
      if explained is None:
        raise
      raise explained from e
    tokenizer = transformers.AutoTokenizer.from_pretrained(model, trust_remote_code=True,
                                                           local_files_only=local)
  net = net.eval().to(device)
  _restore_resampler_positions(net, device)
  return MiniCPMCaptioner(net, tokenizer, max_new_tokens=max_new_tokens, sampling=sampling)


class GenerateCaptioner:
  """processor(images[, prompt]) → model.generate → decoded text minus any echoed prompt."""

  def __init__(self, model, processor, *, max_new_tokens: int, sampling: bool, num_beams: int):
    self.model, self.processor = model, processor
    self.tokenizer = getattr(processor, 'tokenizer', processor)
    self.max_new_tokens, self.sampling, self.num_beams = max_new_tokens, sampling, num_beams

  def _text(self, prompt: str) -> str | None:
    if not prompt:
      return None
    if getattr(self.processor, 'chat_template', None):
      msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': prompt}]}]
      return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
    return prompt

  def __call__(self, images: list, prompt: str) -> list[str]:
    import torch  # pylint: disable=g-import-not-at-top
    text = self._text(prompt)
    kwargs = {'images': images, 'return_tensors': 'pt'}
    if text is not None:
      kwargs.update(text=[text] * len(images), padding=True)
    inputs = self.processor(**kwargs).to(self.model.device)
    if 'pixel_values' in inputs:
      inputs['pixel_values'] = inputs['pixel_values'].to(self.model.dtype)
    with torch.inference_mode():
      out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                do_sample=self.sampling, num_beams=self.num_beams)
    input_ids = inputs.get('input_ids')
    if input_ids is not None:
      length = input_ids.shape[1]
      if out.shape[1] >= length and bool((out[:, :length] == input_ids).all()):
        out = out[:, length:]  # decoder-only models return prompt + answer
    captions = [_clean(c) for c in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
    if text is not None:  # BLIP-style models continue the prompt: keep only the continuation
      echoed = _clean(self.tokenizer.decode(input_ids[0], skip_special_tokens=True))
      captions = [
          c[len(echoed):].strip() if echoed and c.startswith(echoed) else c for c in captions
      ]
    return captions


def load_generate(model: str, device: str, dtype, *, max_new_tokens: int, sampling: bool,
                  num_beams: int, trust_remote_code: bool) -> GenerateCaptioner:
  import transformers  # pylint: disable=g-import-not-at-top
  local = os.path.isdir(model)
  processor = transformers.AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code,
                                                         local_files_only=local)
  tokenizer = getattr(processor, 'tokenizer', None)
  if tokenizer is not None:
    tokenizer.padding_side = 'left'  # batched decoder-only generation needs left padding
  errors = []
  for name in ('AutoModelForImageTextToText', 'AutoModelForVision2Seq'):
    auto = getattr(transformers, name, None)
    if auto is None:
      continue
    try:
      net = auto.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code,
                                 local_files_only=local)
      break
    except ValueError as e:  # "Unrecognized configuration class" for this auto class
      errors.append(f'{name}: {e}')
  else:
    raise ValueError(f'{model} is not an image-to-text model transformers can load with '
                     f'generate(): ' + ' | '.join(errors))
  net = net.eval().to(device)
  return GenerateCaptioner(net, processor, max_new_tokens=max_new_tokens, sampling=sampling,
                           num_beams=num_beams)


def load_captioner(model: str, kind: str = 'auto', *, device: str = 'auto', dtype: str = 'auto',
                   max_new_tokens: int = 40, sampling: bool = False, num_beams: int = 1,
                   trust_remote_code: bool = False) -> Captioner:
  kind = resolve_kind(model, kind)
  device = resolve_device(device)
  quiet_progress_bars()
  dt = torch_dtype(dtype, device)
  log.info('loading %s captioner %s on %s (%s)', kind, model, device, dt)
  if kind == 'minicpm':
    return load_minicpm(model, device, dt, max_new_tokens=max_new_tokens, sampling=sampling)
  return load_generate(model, device, dt, max_new_tokens=max_new_tokens, sampling=sampling,
                       num_beams=num_beams, trust_remote_code=trust_remote_code)
