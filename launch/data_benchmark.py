r"""Data benchmark (a script, not a test): generate, prepare and stream text corpora.

  python -m launch.data_benchmark --sizes_mb=100,1000 --root=/tmp/data_bench [--workers=2]

For each size it generates a corpus of 8 MB text files (random words) under ``--root``,
prepares it with ``launch.prepare_data`` (tokens/s and the peak RSS of the preparation),
streams the store as one of 8 processes would for ``experiments/pretrain/gpt2.py:size=1b``
(seq 2048, global batch 256: 32 rows per process) and as tiny.py does (tokens/s per
process), and trains ``tiny.py`` for a few steps from the store (peak RSS of the training
process: it must not grow with the corpus). Prints a table and writes
``ROOT/results.json``. The machine's load average is printed with the figures.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_SIZES = flags.DEFINE_list('sizes_mb', ['100', '1000'], 'Corpus sizes in MB.')
_ROOT = flags.DEFINE_string('root', '/tmp/data_bench', 'Where corpora and stores go.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Preparation processes (0: all CPUs).')
_STEPS = flags.DEFINE_integer('train_steps', 30, 'Training steps for the RSS measurement.')
_FILE_MB = 8


def generate(directory: str, size_mb: int, seed: int = 0) -> float:
  """Writes ``size_mb`` MB of random-word text in 8 MB files; returns seconds."""
  t0 = time.perf_counter()
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  letters = np.array(list('etaoinshrdlucmfwypvbgkjqxz'))
  vocab = np.array([''.join(rng.choice(letters, size=int(rng.integers(1, 11))))
                    for _ in range(8192)] + ['\n', 'def', '=', '(x):', '\n\n'], dtype=object)
  p = np.ones(len(vocab))
  p[-5:] = [400, 50, 80, 30, 40]
  p /= p.sum()
  for i in range(-(-size_mb // _FILE_MB)):
    path = os.path.join(directory, f'part{i:05d}.txt')
    if os.path.exists(path):
      continue
    words = vocab[rng.choice(len(vocab), size=_FILE_MB * (1 << 20) // 6, p=p)]
    with open(path, 'w') as f:
      f.write(' '.join(words)[:_FILE_MB * (1 << 20)])
  return time.perf_counter() - t0


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
  """Runs ``cmd``; returns (seconds, peak RSS in MB of that process, output)."""
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode:
    raise RuntimeError(f'{cmd[:4]} failed:\n{out[-3000:]}')
  return time.perf_counter() - t0, usage.ru_maxrss // 1024, out


def loader_tokens_per_sec(store: str, seq_len: int, global_batch: int, processes: int,
                          batches: int) -> float:
  from research.config import base_config
  from research.data import pipeline, tokenizers
  c = base_config()
  c.data.source, c.data.path = 'tokens', store
  c.seq_len, c.batch_size = seq_len, global_batch
  it = pipeline.make_lm_iterator(c, tokenizers.ByteTokenizer(), 'train',
                                 batch_size_per_process=global_batch // processes,
                                 process_index=processes - 1, process_count=processes)
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t0
  return batches * b['mask'].size / dt


def main(argv):
  del argv
  results = {'load_average_start': os.getloadavg(), 'cpus': os.cpu_count(), 'sizes': {}}
  py = sys.executable
  for size in map(int, _SIZES.value):
    corpus = os.path.join(_ROOT.value, f'corpus_{size}mb')
    store = os.path.join(_ROOT.value, f'store_{size}mb')
    r: dict = {'generate_s': generate(corpus, size)}
    if not os.path.exists(os.path.join(store, 'manifest.json')):
      secs, rss, out = run_measured(
          [py, '-m', 'launch.prepare_data', '--config=experiments/pretrain/tiny.py',
           f'--out={store}', '--config.data.source=text_files', '--overwrite',
           f'--config.data.path={corpus}/*.txt', f'--workers={_WORKERS.value}'])
      r['prepare_wall_s'], r['prepare_peak_rss_mb'] = secs, rss
    with open(os.path.join(store, 'manifest.json')) as f:
      m = json.load(f)
    tokens = sum(s['tokens'] for s in m['splits'].values())
    r.update(tokens=tokens, prepare_s=m['prepare']['seconds'],
             prepare_workers=m['prepare']['workers'],
             prepare_tokens_per_s=tokens / m['prepare']['seconds'],
             store_mb=sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store)
                          for f in fs) / 1e6)
    r['loader_1b_tokens_per_s_per_process'] = loader_tokens_per_sec(store, 2048, 256, 8, 20)
    r['loader_tiny_tokens_per_s'] = loader_tokens_per_sec(store, 128, 32, 1, 200)
    workdir = os.path.join(_ROOT.value, f'train_{size}mb_{int(time.time())}')
    secs, rss, _ = run_measured(
        [py, '-m', 'launch.train', '--config=experiments/pretrain/tiny.py', f'--workdir={workdir}',
         '--config.data.source=tokens', f'--config.data.path={store}',
         f'--config.steps={_STEPS.value}', '--config.eval_every=1000000',
         '--config.checkpoint_every=1000000', '--config.num_samples=0', '--config.log_every=10'])
    r['train_wall_s'], r['train_peak_rss_mb'] = secs, rss
    results['sizes'][size] = r
    print(json.dumps({size: r}), flush=True)
  results['load_average_end'] = os.getloadavg()
  with open(os.path.join(_ROOT.value, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print(f"\nload average at start {results['load_average_start']}, at end "
        f"{results['load_average_end']} ({results['cpus']} CPUs)")
  print('| corpus | tokens | prepare tokens/s (workers) | prepare peak RSS | loader tokens/s/process '
        '(1b: seq 2048, 32 rows) | loader tokens/s (tiny) | train peak RSS (tiny, '
        f'{_STEPS.value} steps) |')
  print('|---|---|---|---|---|---|---|')
  for size, r in results['sizes'].items():
    print(f"| {size} MB | {r['tokens']:,} | {r['prepare_tokens_per_s']:,.0f} "
          f"({r['prepare_workers']}) | {r.get('prepare_peak_rss_mb', '-')} MB | "
          f"{r['loader_1b_tokens_per_s_per_process']:,.0f} | {r['loader_tiny_tokens_per_s']:,.0f} | "
          f"{r['train_peak_rss_mb']} MB |")


if __name__ == '__main__':
  app.run(main)
