r"""Generates text from any run directory with the KV-cache decoder (research/decode.py).

  python -m launch.generate --run=DIR [--step=N] --prompt=TEXT [--prompt=TEXT ...]
  python -m launch.generate --run=DIR --prompts_file=FILE     # one prompt per line
      [--max_new_tokens=128] [--temperature=0.8] [--top_k=200] [--seed=0] [--greedy]

DIR: a ``--workdir`` of launch.train, an export of one, or a Hugging Face checkpoint
directory (with its ``tokenizer.json``). Prints one JSON object per prompt on stdout:
``{"prompt", "completion", "new_tokens", "stopped_at_eos", "run", "step"}``. The
completion stops at the tokenizer's EOS (our byte models end documents with it).
Sampling: ``softmax(logits / temperature)`` over the ``top_k`` most likely tokens
(0: all); ``--greedy`` (or ``--temperature=0``) takes the argmax. ``--seed`` makes
sampling repeatable. Prompts of the same token length are decoded together in one batch.
An empty prompt starts a new document (the EOS id). Nothing is written into DIR.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from launch import run_flags
from research import runtime

_RUN, _STEP = run_flags.define_run_flags()
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeat the flag for more).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', '', 'A file with one prompt per line '
                                    '(\\n inside a line is a newline).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature (0: greedy).')
_TOP_K = flags.DEFINE_integer('top_k', 200, 'Sample among the k most likely tokens (0: all).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_GREEDY = flags.DEFINE_boolean('greedy', False, 'Argmax decoding (same as --temperature=0).')


def read_prompts(prompts: list[str], prompts_file: str) -> list[str]:
  if prompts and prompts_file:
    raise runtime.UserError('give --prompt or --prompts_file, not both.')
  if prompts_file:
    try:
      with open(prompts_file, encoding='utf-8') as f:
        lines = [line.rstrip('\n') for line in f]
    except OSError as e:
      raise runtime.UserError(f'--prompts_file={prompts_file!r}: {e.strerror}.') from None
    prompts = [line.replace('\\n', '\n') for line in lines if line.strip()]
  if not prompts:
    raise runtime.UserError('no prompt: pass --prompt=TEXT (repeatable) or '
                            '--prompts_file=FILE (one prompt per line).')
  return list(prompts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_flags.required_run(_RUN)
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  temperature = 0.0 if _GREEDY.value else _TEMPERATURE.value
  from research.generation import generate_from_run
  for row in generate_from_run(_RUN.value, prompts, step=_STEP.value,
                               max_new_tokens=_MAX_NEW.value, temperature=temperature,
                               top_k=_TOP_K.value, seed=_SEED.value):
    print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
