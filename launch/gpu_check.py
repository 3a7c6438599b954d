r"""One call that checks a GPU machine before a real run, writing one JSON report.

  python -m launch.gpu_check [--out=gpu_check.json] [--smoke]

Checks (research/gpu_check.py has the details):

1. cuDNN vs XLA attention parity (forward and gradients) for causal, padding, GQA,
   sliding-window and segment-id masks, through the model's own dispatch
   (``research.models.attention.plan_attention``): a case the dispatch sends to XLA
   is reported as ``fallback`` with its reason;
2. bfloat16 vs float32 loss agreement over a few training steps of the same model;
3. all-reduce bandwidth for every pair of visible devices, and over all of them;
4. the 1B benchmark (``experiments/pretrain/gpt2.py:size=1b``): tokens/s and MFU
   against 989 TFLOP/s (H100/H200 dense bf16).

Without a GPU (CPU devices) the cuDNN parts are reported as ``"skipped: no GPU"``
and everything else runs; ``--smoke`` shrinks every size so the whole call takes
seconds on CPU (what tests/test_gpu_check.py runs). Exit code 0 when every check
that ran passed, 1 otherwise (the JSON says which).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

_OUT = flags.DEFINE_string('out', None, 'Write the JSON report here (default: stdout only).')
_SMOKE = flags.DEFINE_boolean('smoke', False, 'Tiny sizes (CPU tests).')
_SKIP = flags.DEFINE_list('skip', [], 'Checks to leave out: attention, precision, allreduce, '
                          'benchmark.')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from research import gpu_check
  report = gpu_check.run_all(smoke=_SMOKE.value, skip=tuple(_SKIP.value),
                             log=lambda s: print(s, flush=True))
  text = json.dumps(report, indent=2, sort_keys=True, default=str)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')
    print(f'gpu_check: wrote {_OUT.value}', flush=True)
  print(gpu_check.summary(report), flush=True)
  return 0 if report['ok'] else 1


if __name__ == '__main__':
  from research import gpu_env
  if '--smoke' not in sys.argv[1:]:
    gpu_env.apply()  # The flags a GPU run gets from the launchers (before JAX starts).
  app.run(lambda argv: sys.exit(main(argv)))
