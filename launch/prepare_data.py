r"""Tokenizes a config's data source once into a token store (research/data/token_store.py).

  python -m launch.prepare_data --config=experiments/pretrain/tiny.py[:arg] --out=DIR \
      [--config.data.source=jsonl --config.data.path='~/corpus/*.jsonl' ...] [--workers=N]

Then train from it with ``--config.data.source=tokens --config.data.path=DIR`` (same
tokenizer; a SentencePiece model trained here is saved in ``DIR/tokenizer/spm.model``
and used by runs reading the store). Runs that name a raw source do the same step
automatically into a cache; this command is for corpora you prepare once and share.
Exit codes: 0 done; 1 error (the last line on stderr is ``error: ...``).
"""

import os
import sys
import tempfile

from absl import app, flags, logging

from research import config_files, runtime

_CONFIG = config_files.DEFINE_config_file('config')
_OUT = flags.DEFINE_string('out', None, 'Directory of the token store to write.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Tokenizing processes; 0: data.prepare_workers '
                                '(0: all CPUs).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing store at --out.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from research.data import catalog, sources, token_store, tokenizers
  out = os.path.abspath(os.path.expanduser(_OUT.value or ''))
  if not _OUT.value:
    raise runtime.UserError('--out is required; pass --out=DIR (the store to write).')
  config = _CONFIG.value
  data = config.data
  if data.source == 'tokens':
    raise runtime.UserError('data.source=tokens is already a store; name a raw source '
                            '(stdlib, text_files, jsonl, parquet, tfds).')
  catalog.validate_data_config(data)
  if os.path.exists(out) and os.listdir(out) and not _OVERWRITE.value:
    if not os.path.exists(os.path.join(out, token_store.MANIFEST)):
      raise runtime.UserError(f'--out={out} exists and is not a token store; pass an empty '
                              f'or new directory.')
    raise runtime.UserError(f'--out={out} already holds a token store; pass --overwrite to '
                            f'replace it.')
  corpus_root = sources.file_corpus(data).root if data.source != 'tfds' else None
  if corpus_root and (out + os.sep).startswith(os.path.abspath(corpus_root) + os.sep):
    raise runtime.UserError(f'--out={out} is inside the corpus ({corpus_root}); write the '
                            f'store elsewhere (a rerun would read it as input).')
  with tempfile.TemporaryDirectory(prefix='prepare_tok_') as tmp:
    tokenizer = tokenizers.make_tokenizer(data, tmp)
  manifest = token_store.prepare(data, tokenizer, out,
                                 workers=_WORKERS.value or int(data.prepare_workers))
  if data.tokenizer == 'sentencepiece':
    tokenizer.save(tokenizers.spm_model_path(out))
  logging.info(token_store.describe(manifest))
  sources.ReadStats(**manifest['read']).log_warnings(data)
  total = sum(s['tokens'] for s in manifest['splits'].values())
  secs = manifest['prepare']['seconds']
  print(f'prepared {out}: {total:,} tokens in {secs:.1f}s ({total / max(secs, 1e-9):,.0f} '
        f'tokens/s, {manifest["prepare"]["workers"]} worker(s)); train with '
        f'--config.data.source=tokens --config.data.path={out}')


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
