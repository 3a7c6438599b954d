"""Sequence classification: a pooled linear head on the Transformer's final hidden states.

Data (``data.source``):
  * ``stdlib`` (offline): which standard-library module a Python function comes from
    (research/data/functions_task.py; ``finetune.max_classes`` >= 10 classes).
  * ``tfds``: any TFDS dataset with a text feature (``data.text_key``) and a
    ``ClassLabel`` feature (``finetune.label_key``), e.g. ``glue/sst2``
    (text_key=sentence, eval_split=validation) or ``imdb_reviews`` (eval_split=test).

Each example is ``tokens(text)[:seq_len - 1] + [EOS]``, right-padded to ``seq_len``.
The model is the decoder (``model.causal=True``) or a bidirectional encoder
(``model.causal=False``); ``finetune.pooling`` picks the last real token (the EOS,
which has seen the whole text in a decoder), the mean over real tokens, or the first.

Batches (numpy, per process): ``inputs`` [B, L] int32, ``input_mask`` [B, L] float32,
``label`` [B, 1] int32 and ``mask`` [B, 1] float32 (1 = real example, 0 = padding row of
a finite eval pass). Eval metrics: loss, accuracy, macro-F1 (over the classes present
in the eval labels) and a per-class precision/recall/F1/support report.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from flax.core import spmd

from research.config import POOLINGS, ConfigError
from research.data import examples, sources
from research.data.tokenizers import Tokenizer
from research.models.layers import normal_init
from research.models.transformer import Transformer
from research.tasks import Task


# --------------------------------------------------------------------------- model


class SequenceClassifier(Transformer):
  """The Transformer backbone (same parameter paths) plus ``head`` [D, K] (+ bias).

  The backbone has no output projection (a pretrained ``unembed`` is not loaded).
  ``__call__(tokens_BL, mask_BL=...)`` returns float32 class logits ``[B, K]``.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, num_classes: int, pooling: str,
               rngs: nnx.Rngs):
    backbone_cfg = ml_collections.ConfigDict(cfg.to_dict())
    backbone_cfg.tie_embeddings = True  # No unembed: the head replaces it.
    super().__init__(backbone_cfg, rngs=rngs)
    if pooling not in POOLINGS:
      raise ConfigError(f'finetune.pooling={pooling!r} is unknown; use one of {POOLINGS}.')
    self.pooling = pooling
    self.num_classes = int(num_classes)

    def build():
      self.head = nnx.Linear(
          cfg.d_model, num_classes, use_bias=True, dtype=jnp.float32,
          param_dtype=jnp.float32, kernel_init=normal_init(cfg.init_std, ('embed', 'classes')),
          bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, ('classes',)), rngs=rngs)

    if spmd.get_logical_axis_rules():
      build()
    else:
      with nnx.use_eager_sharding(False):
        build()

  def __call__(self, tokens_BL: jax.Array, *, mask_BL: jax.Array | None = None,
               deterministic: bool = True, **unused: Any) -> jax.Array:
    if mask_BL is None:
      mask_BL = jnp.ones(tokens_BL.shape, jnp.float32)
    mask_BL = mask_BL.astype(jnp.float32)
    # A row with no real token (padding rows of a finite pass) would attend to nothing.
    attn_mask_BL = mask_BL.at[:, 0].set(1.0)
    h_BLD = super().__call__(tokens_BL, deterministic=deterministic, return_hidden=True,
                             mask_BL=attn_mask_BL).astype(jnp.float32)
    if self.pooling == 'mean':
      pooled_BD = (h_BLD * attn_mask_BL[..., None]).sum(1) / attn_mask_BL.sum(1)[:, None]
    elif self.pooling == 'first':
      pooled_BD = h_BLD[:, 0]
    else:
      last_B = jnp.maximum(mask_BL.sum(1).astype(jnp.int32) - 1, 0)
      pooled_BD = jnp.take_along_axis(h_BLD, last_B[:, None, None], axis=1)[:, 0]
    return self.head(pooled_BD)


# --------------------------------------------------------------------------- objective


def classification_forward(model, batch, deterministic: bool):
  """Class logits [B, K] in float32."""
  return model(batch['inputs'], mask_BL=batch['input_mask'],
               deterministic=deterministic).astype(jnp.float32)


def example_weights(batch) -> jax.Array:
  """1 for a real example, 0 for a padding row of a finite eval pass: [B]."""
  return batch['mask'][:, 0].astype(jnp.float32)


def classification_loss(model, logits_BK, batch, deterministic: bool):
  """Mean cross-entropy over real examples; eval also returns the confusion matrix."""
  del model
  labels_B = batch['label'][:, 0].astype(jnp.int32)
  w_B = example_weights(batch)
  denom = jnp.maximum(w_B.sum(), 1.0)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BK, labels_B)
  loss = jnp.where(w_B > 0, ce_B, 0.0).sum() / denom
  pred_B = jnp.argmax(logits_BK, axis=-1)
  acc = jnp.where(w_B > 0, (pred_B == labels_B).astype(jnp.float32), 0.0).sum() / denom
  aux = {'loss': loss, 'accuracy': acc}
  if deterministic:  # Eval only: train metrics rows hold scalars.
    k = logits_BK.shape[-1]
    onehot_true = jax.nn.one_hot(labels_B, k) * w_B[:, None]
    onehot_pred = jax.nn.one_hot(pred_B, k)
    aux['confusion'] = (onehot_true.T @ onehot_pred) / denom  # x weight = counts.
  return loss, aux


def classification_report(confusion: np.ndarray, class_names: Sequence[str]
                          ) -> dict[str, Any]:
  """accuracy, macro_f1 and per-class precision/recall/f1/support from a confusion
  matrix ``[true, pred]`` of counts. Macro-F1 averages the classes with support > 0."""
  c = np.asarray(confusion, np.float64)
  tp = np.diag(c)
  support = c.sum(1)
  predicted = c.sum(0)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  present = support > 0
  total = c.sum()
  per_class = {name: {'precision': float(precision[i]), 'recall': float(recall[i]),
                      'f1': float(f1[i]), 'support': int(round(support[i]))}
               for i, name in enumerate(class_names)}
  return {'accuracy': float(tp.sum() / total) if total else 0.0,
          'macro_f1': float(f1[present].mean()) if present.any() else 0.0,
          'per_class': per_class}


def format_report(report: dict[str, Any]) -> str:
  lines = [f'{"class":<20} {"precision":>9} {"recall":>7} {"f1":>7} {"support":>8}']
  for name, r in report['per_class'].items():
    lines.append(f'{name:<20} {r["precision"]:>9.3f} {r["recall"]:>7.3f} {r["f1"]:>7.3f} '
                 f'{r["support"]:>8d}')
  lines.append(f'accuracy {report["accuracy"]:.4f}  macro-F1 {report["macro_f1"]:.4f}')
  return '\n'.join(lines)


def make_finalize(class_names: Sequence[str]):
  def finalize(sums: dict[str, Any]) -> dict[str, Any]:
    w = float(sums['weight'])
    report = classification_report(np.asarray(sums['confusion']), class_names)
    logging.info('eval per-class report (%d examples):\n%s', int(w), format_report(report))
    return {'loss': float(sums['loss']) / w, 'accuracy': report['accuracy'],
            'macro_f1': report['macro_f1'], 'num_examples': w,
            'per_class': report['per_class']}
  return finalize


# --------------------------------------------------------------------------- data


class ExampleSource(Sequence):
  """(text, label) pairs of one split; random access, picklable."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    split = sources.resolve_split(config.data, split)
    self.split = split
    if config.data.source == 'stdlib':
      d = stdlib_data(config)
      self._pairs = d.train if split == 'train' else d.eval
      self._tfds = None
    elif config.data.source == 'tfds':
      _register_tfds(config.data.name)
      self._tfds = sources.open_tfds(config.data, split)
      self.text_key, self.label_key = config.data.text_key, config.finetune.label_key
      self._pairs = None
      if len(self._tfds):
        example = self._tfds[0]
        for key, name in ((self.text_key, 'data.text_key'),
                          (self.label_key, 'finetune.label_key')):
          if key not in example:
            raise ConfigError(f"{name}='{key}' is not a feature of TFDS dataset "
                              f"'{config.data.name}'; it has {sorted(example)}.")
    else:
      raise ConfigError(f"task=classification reads data.source='stdlib' (the functions "
                        f"task) or 'tfds', not {config.data.source!r}.")

  def __len__(self) -> int:
    return len(self._pairs) if self._pairs is not None else len(self._tfds)

  def __getitem__(self, i: int) -> tuple[str, int]:  # type: ignore[override]
    if self._pairs is not None:
      return self._pairs[i]
    ex = self._tfds[i]
    return sources._as_text(ex[self.text_key]), int(np.asarray(ex[self.label_key]))


def _register_tfds(name: str) -> None:
  """tfds 4.9 registers the legacy ``glue`` builder only once its module is imported."""
  if name.startswith('glue'):
    try:
      import tensorflow_datasets.text.glue  # noqa: F401
    except ImportError:
      pass


def stdlib_data(config: ml_collections.ConfigDict):
  from research.data import functions_task
  f = config.finetune
  return functions_task.classification_data(
      float(config.data.eval_fraction), int(f.max_classes), int(f.max_train_per_class),
      int(f.max_eval_per_class))


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names from the data (stdlib modules, or the TFDS ClassLabel names)."""
  if config.data.source == 'stdlib':
    return tuple(stdlib_data(config).classes)
  if config.data.source == 'tfds':
    import tensorflow_datasets as tfds
    _register_tfds(config.data.name)
    try:
      builder = tfds.builder(config.data.name, data_dir=config.data.tfds_data_dir or None)
      feature = builder.info.features[config.finetune.label_key]
      names = tuple(getattr(feature, 'names', None) or ())
      if names:
        return names
      n = int(getattr(feature, 'num_classes', 0))
    except Exception:  # pylint: disable=broad-except
      n = 0
    n = n or int(config.finetune.num_classes)
    if not n:
      raise ConfigError(f"cannot read the classes of TFDS dataset '{config.data.name}' "
                        f"(feature '{config.finetune.label_key}'); set finetune.num_classes.")
    return tuple(str(i) for i in range(n))
  raise ConfigError(f"task=classification reads data.source='stdlib' or 'tfds', not "
                    f"{config.data.source!r}.")


class _Encode:
  """(text, label) -> fixed-length example dict (tokens + EOS, right-padded)."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def __call__(self, pair: tuple[str, int]) -> dict[str, np.ndarray]:
    text, label = pair
    ids = np.asarray(self.tokenizer.encode(text), np.int32)[:self.seq_len - 1]
    ids = np.append(ids, self.tokenizer.eos_id).astype(np.int32)
    inputs = np.full([self.seq_len], self.tokenizer.pad_id, np.int32)
    inputs[:len(ids)] = ids
    mask = np.zeros([self.seq_len], np.float32)
    mask[:len(ids)] = 1.0
    return {'inputs': inputs, 'input_mask': mask, 'label': np.array([label], np.int32),
            'mask': np.ones([1], np.float32)}


def make_classification_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                                 split: str, *, batch_size_per_process: int,
                                 process_index: int = 0, process_count: int = 1,
                                 shuffle: bool = True, repeat: bool = True):
  """A checkpointable grain iterator of classification batches (see the module doc)."""
  src = ExampleSource(config, split)
  if len(src) == 0:
    raise ConfigError(f'the {split} split of the classification data is empty.')
  return examples.example_iterator(
      src, _Encode(tokenizer, config.seq_len), seed=config.seed,
      batch_size_per_process=batch_size_per_process, process_index=process_index,
      process_count=process_count, shuffle=shuffle, repeat=repeat,
      num_threads=2 if config.data.source == 'tfds' else 0)


# --------------------------------------------------------------------------- task


def make_task(config: ml_collections.ConfigDict) -> Task:
  names = class_names(config)
  k = int(config.finetune.num_classes) or len(names)
  if len(names) != k:
    raise ConfigError(f'finetune.num_classes={k} but the data has {len(names)} classes; '
                      f'set it to 0 (from the data).')

  def build():
    return SequenceClassifier(config.model, num_classes=k, pooling=config.finetune.pooling,
                              rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))

  return Task(name='classification', forward=classification_forward,
              loss=classification_loss, weights=example_weights,
              make_iterator=make_classification_iterator, build_model=build,
              finalize_eval=make_finalize(names), decode_samples=False)
