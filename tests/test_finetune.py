"""Fine-tuning: partial restore from our checkpoints (other mesh, any step, clear shape
errors), modes (frozen params get no optimizer state), the classification / SFT / LM
tasks, the offline functions data, and the one-command ablation at smoke size."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import runs
from research.finetune import init as ft_init
from tests.helpers import REPO, smoke_config

FT = {'task': 'classification', 'data.eval_fraction': 0.2, 'num_samples': 0, 'steps': 2,
      'eval_every': 2, 'eval_steps': 2, 'checkpoint_every': 2,
      'finetune.max_train_per_class': 20, 'finetune.max_eval_per_class': 4}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A smoke pretraining saved under a 2x2x2 (data, fsdp, tensor) mesh, steps 2 and 4."""
  from research.recipe import run as train
  wd = str(tmp_path_factory.mktemp('ft') / 'pretrain')
  train(smoke_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'steps': 4,
                        'checkpoint_every': 2, 'eval_every': 4, 'eval_steps': 1,
                        'num_samples': 0, 'data.eval_fraction': 0.2}), wd)
  return wd


def _state_for(config, abstract=False):
  """(train state, task, mesh) of a fine-tuning config, as the trainer builds them
  (``abstract``: shapes and shardings only, nothing compiled or allocated)."""
  from research import recipe
  from research import sharding as shd
  from research.train_state import abstract_train_state, create_train_state
  config, task, _ = recipe.compose(config, build_tokenizer=False)
  mesh = shd.mesh_from_config(config.mesh)
  make = abstract_train_state if abstract else create_train_state
  return make(config, mesh, task), task, mesh, config


def _params(state) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)
          if isinstance(v, nnx.Param)}


def test_restore_onto_another_mesh_and_any_step(pretrained, tmp_path):
  src_cfg = smoke_config(**FT, **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  src_ts, *_ = _state_for(src_cfg, abstract=True)  # The mesh it was saved on.
  src, _ = runs.restore_params(pretrained, -1, src_ts.state[0])
  assert src['embed/embedding'].sharding.mesh.shape['tensor'] == 2
  src = {p: np.asarray(a) for p, a in src.items()}
  c = smoke_config(**FT, **{'finetune.init_from': pretrained, 'mesh.data': 4, 'mesh.fsdp': 2})
  ts, task, mesh, c = _state_for(c)
  state = task.initialize(ts, str(tmp_path))
  got = _params(state[0])
  report = json.load(open(tmp_path / ft_init.REPORT))
  assert report['step'] == 4 and report['kind'] == 'checkpoint'
  assert set(report['loaded']) == set(src) == set(got) - {'head/kernel', 'head/bias'}
  assert report['ignored'] == []
  assert set(report['created']) == {'head/kernel', 'head/bias'}
  for p in src:
    np.testing.assert_array_equal(got[p], src[p], err_msg=p)
  emb = state[0]['embed']['embedding'][...]
  assert dict(emb.sharding.mesh.shape) == dict(mesh.shape) and mesh.shape['fsdp'] == 2
  # An earlier step by finetune.init_step.
  arrays, rep2 = runs.restore_params(pretrained, 2, ts.state[0])
  assert rep2['step'] == 2
  assert not np.array_equal(np.asarray(arrays['embed/embedding']), src['embed/embedding'])
  with pytest.raises(runs.RunError, match='step 3 is not in'):
    runs.restore_params(pretrained, 3, ts.state[0])


def test_mismatched_shapes_are_a_clear_error(pretrained):
  c = smoke_config(**FT)
  c.model.d_model = 48  # Not the checkpoint's 32 (init_from unset: no arch copy).
  ts, *_ = _state_for(c, abstract=True)
  with pytest.raises(runs.RunError, match=r'11 parameter\(s\) .* step 4 do not fit .*'
                     r'blocks/attn/key/kernel: source \(2, 32, 4, 8\) vs model \(2, 48, 4, 12\)'):
    runs.restore_params(pretrained, -1, ts.state[0])


@pytest.mark.parametrize('mode', ['linear_probe', 'lora'])
def test_frozen_parameters_have_no_optimizer_state(mode):
  import math
  c = smoke_config(**FT, **{'finetune.mode': mode, 'finetune.lora_rank': 4})
  ts, *_ = _state_for(c, abstract=True)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  model_state, opt_state = ts.state[0], ts.state[1]
  n_head = size(model_state['head'])
  n_lora = size(nnx.filter_state(model_state, nnx.LoRAParam))
  assert n_head == 32 * 12 + 12 and (n_lora > 0) == (mode == 'lora')
  moments = [x for x in jax.tree.leaves(opt_state) if len(x.shape) > 0]
  assert sum(math.prod(x.shape) for x in moments) == 2 * (n_head + n_lora)  # Adam mu, nu.


def test_linear_probe_run_trains_only_the_head(pretrained, tmp_path):
  from research.recipe import run as train
  wd = str(tmp_path / 'probe')
  train(smoke_config(**FT, **{'finetune.init_from': pretrained,
                              'finetune.mode': 'linear_probe'}), wd)
  report = json.load(open(os.path.join(wd, ft_init.REPORT)))
  assert report['trainable'] == ['head/bias', 'head/kernel']
  assert report['frozen_params'] == report['loaded_params'] > 0
  evals = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))
           if '"eval"' in l]
  last = evals[-1]
  assert {'loss', 'accuracy', 'macro_f1', 'per_class'} <= set(last)
  assert len(last['per_class']) == 12 and 0 <= last['macro_f1'] <= 1
  assert set(last['per_class']['email']) == {'precision', 'recall', 'f1', 'support'}
  ts, *_ = _state_for(smoke_config(**FT), abstract=True)
  src, _ = runs.restore_params(pretrained, -1, ts.state[0])
  tuned, rep = runs.restore_params(wd, -1, ts.state[0])
  assert rep['step'] == 2 and set(src) | {'head/kernel', 'head/bias'} == set(tuned)
  for p in src:  # The backbone did not move.
    np.testing.assert_array_equal(np.asarray(tuned[p]), np.asarray(src[p]), err_msg=p)


def test_classification_metrics_report():
  from research.tasks.classification import classification_report
  conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # Class 2 absent from the labels.
  r = classification_report(conf, ['a', 'b', 'c'])
  assert r['accuracy'] == pytest.approx(5 / 6)
  f1_a, f1_b = 2 * 1 * .75 / 1.75, 2 * (2 / 3) * 1 / (2 / 3 + 1)
  assert r['macro_f1'] == pytest.approx((f1_a + f1_b) / 2)
  assert r['per_class']['b'] == {'precision': pytest.approx(2 / 3), 'recall': 1.0,
                                 'f1': pytest.approx(f1_b), 'support': 2}


@pytest.mark.parametrize('causal,pooling', [(True, 'last'), (False, 'mean')])
def test_classifier_pooling_ignores_padding(causal, pooling):
  from research.tasks.classification import SequenceClassifier
  c = smoke_config().model
  c.vocab_size, c.causal, c.scan_layers = 259, causal, False  # Eager: no scan to trace.
  model = SequenceClassifier(c, num_classes=5, pooling=pooling, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(0).randint(3, 259, size=(1, 10)), jnp.int32)
  padded = jnp.concatenate([x, jnp.zeros((1, 6), jnp.int32)], 1)
  mask = jnp.concatenate([jnp.ones((1, 10)), jnp.zeros((1, 6))], 1)
  call = nnx.jit(lambda m, t, k: m(t, mask_BL=k))
  a = call(model, x, jnp.ones(x.shape))
  b = call(model, padded, mask)
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert a.shape == (1, 5) and a.dtype == jnp.float32
  # Bidirectional: the first position sees the last token; causal: it does not.
  h = lambda t: model.__class__.__mro__[1].__call__(model, t, return_hidden=True)[0, 0]
  changed = x.at[0, -1].set(7 if int(x[0, -1]) != 7 else 8)
  moved = float(jnp.abs(h(x) - h(changed)).max())
  assert (moved > 1e-6) == (not causal)


def test_functions_data_is_deterministic_and_disjoint():
  from research.data import functions_task as ft
  d = ft.classification_data(0.2, 12, 400, 100)
  assert len(d.classes) >= 10 and list(d.classes) == sorted(d.classes)
  train_texts = {t for t, _ in d.train}
  assert not train_texts & {t for t, _ in d.eval}
  assert len(train_texts) == len(d.train)  # No duplicate within a split either.
  assert d.train[:5] == ft.classification_data(0.2, 12, 400, 100).train[:5]
  fns = ft.extract_functions('class A:\n  def f(self):\n    def g():\n      return 1\n'
                             '    return g\n\nasync def h(x):\n  await x\n', 'pkg/m.py')
  assert [f.qualname for f in fns] == ['A.f', 'A.f.g', 'h'] and fns[0].module == 'pkg'
  assert fns[1].text.startswith('def g():')
  prompt, response = ft.split_docstring('def f(a):\n    """Doc."""\n    return a\n')
  assert prompt.endswith('"""Doc."""\n') and response == '    return a\n'


def test_sft_masks_only_the_response():
  from research.data.tokenizers import ByteTokenizer
  from research.tasks.sft import EncodePair
  tok = ByteTokenizer()
  ex = EncodePair(tok, 32)(('def f():', ' return 1'))
  n_prompt = 1 + len('def f():')  # BOS + prompt.
  targets, mask = ex['targets'], ex['mask']
  assert tok.decode(targets[mask > 0]) == ' return 1'
  assert targets[mask > 0][-1] == tok.eos_id and mask.sum() == len(' return 1') + 1
  assert (mask[:n_prompt - 1] == 0).all()
  np.testing.assert_array_equal(ex['inputs'][1:n_prompt + 9], targets[:n_prompt + 8])


def test_sft_lora_run_from_pretrained(pretrained, tmp_path):
  from research.recipe import run as train
  wd = str(tmp_path / 'sft')
  summary = train(smoke_config(**{**FT, 'task': 'sft', 'finetune.init_from': pretrained,
                                  'finetune.mode': 'lora', 'finetune.lora_rank': 2,
                                  'finetune.lora_dropout': 0.1, 'seq_len': 64}), wd)
  report = json.load(open(os.path.join(wd, ft_init.REPORT)))
  assert report['trainable_params'] == report['lora_params'] > 0
  assert all('lora_' in p for p in report['trainable']) and report['ignored'] == []
  assert np.isfinite(summary['final_eval_loss'])
  # Export merges the adapters: same logits as base + adapters, plain architecture.
  from research.finetune.export import export
  from research.recipe import load_run_model
  from research.models import lora
  out = str(tmp_path / 'merged')
  assert export(wd, out)['merged_lora_modules'] == 7
  adapted, cfg, _ = load_run_model(wd)
  assert any(np.abs(np.asarray(m.lora_b[...])).max() > 0 for _, m in lora.lora_modules(adapted))
  forward = nnx.jit(lambda m, x: m(x))
  x = jnp.asarray(np.random.RandomState(0).randint(3, 259, size=(2, 16)), jnp.int32)
  want = np.asarray(forward(adapted, x))
  saved = json.load(open(os.path.join(out, 'config.json')))['config']
  assert saved['finetune']['mode'] == 'full'
  plain = smoke_config(**{**FT, 'task': 'sft', 'seq_len': 64})
  ts, *_ = _state_for(plain, abstract=True)  # The un-adapted architecture.
  arrays, _ = runs.restore_params(out, -1, ts.state[0])
  assert set(arrays) == set(runs.flat_params(ts.state[0]))
  assert not any('lora' in p for p in arrays)
  merged = lora.merge_lora(adapted)
  for p, a in arrays.items():
    np.testing.assert_array_equal(np.asarray(a), _params(nnx.state(merged))[p], err_msg=p)
  np.testing.assert_allclose(np.asarray(forward(merged, x)), want, atol=1e-5)


def test_continued_lm_on_a_new_domain(pretrained, tmp_path):
  from research.recipe import run as train
  docs = tmp_path / 'domain'
  docs.mkdir()
  for i in range(6):
    (docs / f'doc{i}.txt').write_text(f'A new domain, document {i}. ' * 40)
  wd = str(tmp_path / 'lm')
  c = smoke_config(**{**FT, 'task': 'lm', 'data.source': 'text_files',
                      'data.path': str(docs / '*.txt'), 'finetune.init_from': pretrained,
                      'finetune.init_step': 2, 'model.d_model': 64})
  train(c, wd)
  report = json.load(open(os.path.join(wd, ft_init.REPORT)))
  assert report['step'] == 2 and report['created'] == [] and report['ignored'] == []
  saved = json.load(open(os.path.join(wd, 'config.json')))['config']
  assert saved['model']['d_model'] == 32  # The source's architecture, not the override.


def test_tfds_classification_batches_mocked():
  import tensorflow_datasets as tfds
  from research.data.tokenizers import ByteTokenizer
  from research.tasks import classification as cls
  from experiments.finetune import sst2
  c = sst2.get_config('smoke=True')
  with tfds.testing.mock_data(num_examples=12):
    assert cls.class_names(c) == ('negative', 'positive')
    it = cls.make_classification_iterator(c, ByteTokenizer(), 'eval',
                                          batch_size_per_process=8, shuffle=False,
                                          repeat=False)
    batches = list(it)
  assert len(batches) == 2 and batches[1]['mask'].sum() == 4  # 12 = 8 + 4 (+ 4 padding).
  b = batches[0]
  assert b['inputs'].shape == (8, c.seq_len) and b['label'].shape == (8, 1)
  assert set(np.unique(b['label'])) <= {0, 1}


def test_ablation_one_command_smoke(pretrained, tmp_path):
  """research.finetune.ablation: sweep (scratch vs pretrained probe) and the table."""
  from research.finetune import ablation
  wd = tmp_path / 'abl'
  shutil.copytree(pretrained, wd / 'pretrain')  # Finished (summary.json): not redone.
  config = os.path.join(REPO, 'tests', 'finetune_sweep_config.py')
  logs = []
  rc = ablation.run(str(wd), config, smoke=True, log=logs.append)
  assert rc == 0, logs
  md = (wd / 'results_finetune.md').read_text()
  assert '| pretrained | linear_probe |' in md and '| scratch | linear_probe |' in md
  rows = list(csv_rows(wd / 'results_finetune.csv'))
  assert len(rows) == 2 and all(0 <= float(r['accuracy']) <= 1 for r in rows)
  assert any('linear_probe: pretrained accuracy' in line for line in logs)


def csv_rows(path):
  import csv
  with open(path) as f:
    yield from csv.DictReader(f)
