"""Any run directory as (model, config, tokenizer, step): what eval and generate load.

Three kinds of directory are accepted, told apart by their ``config.json``:

* ``run``: a ``--workdir`` written by ``launch.train`` (its model rebuilt as the run
  built it by :func:`research.recipe.load_run_model`; LoRA modules included);
* ``export``: a directory written by an exporter of ours (research/finetune/export.py,
  the compression exports): the same layout, marked by ``exported_from``;
* ``hf``: a Hugging Face checkpoint directory (``config.json`` with ``model_type`` +
  safetensors), mapped by research/models/hf_import.py, its ``tokenizer.json`` wrapped
  by :class:`~research.models.hf_import.HFTokenizer`. It has no step and no data of
  its own: evaluation uses the default config's data (the stdlib corpus) unless
  overridden.

Nothing is written into the directory: a SentencePiece run whose ``tokenizer/spm.model``
is missing is an error here (training would otherwise train a new one into it).

Config overrides (``--config.KEY=VALUE`` of the commands) apply to what is *evaluated*
(``data.*``, ``eval_tokens``, ``batch_size``, ``seq_len``, ``mesh.*``...), never to the
model: ``model.*`` and the feature sections come from the directory and are refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from research import run_logs, runs
from research import sharding as shd
from research.config import ConfigError, base_config, override

# Override sections that would change which model is loaded: refused.
MODEL_SECTIONS = ('model', 'finetune', 'quant', 'distill', 'prune', 'qat_init')


@dataclasses.dataclass
class LoadedRun:
  model: nnx.Module
  config: ml_collections.ConfigDict  # Resolved: data.*/eval keys to evaluate with.
  tokenizer: Any
  step: int | None  # None for an HF directory.
  kind: str  # 'run', 'export' or 'hf'.
  path: str
  mesh: jax.sharding.Mesh

  @property
  def context_len(self) -> int:
    """Tokens a scored sequence may have: the trained ``seq_len`` for our runs (what the
    model saw), the model's positions for an HF model."""
    if self.kind == 'hf':
      return int(self.config.model.max_seq_len)
    return int(min(self.config.seq_len, self.config.model.max_seq_len))

  def describe(self) -> dict[str, Any]:
    return {'run': self.path, 'kind': self.kind, 'step': self.step}


def kind_of(path: str) -> str:
  """'hf', 'export' or 'run'; a one-line RunError for anything else."""
  if not os.path.isdir(path):
    raise runs.RunError(f'--run={path}: no such directory; give a --workdir of launch.train, '
                        f'an export of one, or a Hugging Face checkpoint directory.')
  if runs.is_hf_dir(path):
    return 'hf'
  if runs.is_run_dir(path):
    meta = run_logs.read_json(os.path.join(path, runs.CONFIG))
    return 'export' if 'exported_from' in meta else 'run'
  raise runs.RunError(f'--run={path} is neither a run of ours (config.json written by '
                      f'launch.train) nor a Hugging Face checkpoint directory (config.json '
                      f'with model_type + model.safetensors).')


def _split_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
  bad = sorted(k for k in overrides if k.split('.')[0] in MODEL_SECTIONS)
  if bad:
    raise ConfigError(f'--config.{bad[0]}: the model comes from the run directory; only '
                      f'what is evaluated can be overridden (data.*, eval_tokens, eval_steps, '
                      f'batch_size, seq_len, mesh.*).')
  return overrides


def _spm_guard(config: ml_collections.ConfigDict, path: str) -> None:
  from research.data.tokenizers import spm_model_path
  if config.data.tokenizer == 'sentencepiece' and not os.path.exists(spm_model_path(path)):
    raise runs.RunError(f'{path} uses a SentencePiece tokenizer but {spm_model_path(path)} '
                        f'is missing; copy the run\'s tokenizer/ directory back.')


def _load_ours(path: str, step: int, overrides: dict[str, Any]) -> LoadedRun:
  from research import recipe
  raw = runs.read_config(path)
  _spm_guard(raw, path)
  tokenizer = recipe.make_tokenizer(raw, path)  # An HF fine-tuning source's tokenizer too.
  mesh_cfg = ml_collections.ConfigDict(raw.mesh.to_dict())
  override(ml_collections.ConfigDict({'mesh': mesh_cfg}),
           {k: v for k, v in overrides.items() if k.startswith('mesh.')})
  mesh = shd.mesh_from_config(mesh_cfg)
  model, config, got = recipe.load_run_model(path, step, mesh=mesh)
  override(config, overrides)
  return LoadedRun(model, config, tokenizer, int(got), kind_of(path), path, mesh)


def _load_hf(path: str, step: int, overrides: dict[str, Any]) -> LoadedRun:
  from research import recipe
  from research.models import hf_import
  from research.train_state import create_train_state
  if step not in (-1, None):
    raise runs.RunError(f'--step={step}: {path} is a Hugging Face directory (one set of '
                        f'weights, no steps); drop --step.')
  hf_import.check_weights(path)
  config = base_config()
  config.finetune.init_from = path  # take_architecture + the HF tokenizer, as fine-tuning.
  config.seq_len = min(config.seq_len, int(hf_import.model_config(path)['max_seq_len']))
  override(config, overrides)
  if not os.path.exists(os.path.join(path, 'tokenizer.json')):
    raise runs.RunError(f'{path} has no tokenizer.json; eval and generate need the model\'s '
                        f'own tokenizer (copy it from the model\'s hub page).')
  config, task, tokenizer = recipe.compose(config)
  mesh = shd.mesh_from_config(config.mesh)
  ts = create_train_state(config, mesh, task)
  arrays, _ = runs.restore_hf_params(path, config.model, ts.state[0])
  missing = sorted(set(runs.flat_params(ts.state[0])) - set(arrays))
  if missing:
    raise runs.RunError(f'{path} lacks parameters {missing[:5]}.')
  model, _ = nnx.merge(ts.graphdef, runs.replace_params(ts.state, arrays))
  config.finetune.init_from = ''
  return LoadedRun(model, config, tokenizer, None, 'hf', path, mesh)


def load(path: str, step: int = -1, overrides: dict[str, Any] | None = None) -> LoadedRun:
  """The model of ``path`` (any kind, module doc) at ``step`` (-1: latest)."""
  path = runs.resolve(path)
  overrides = _split_overrides(dict(overrides or {}))
  if kind_of(path) == 'hf':
    return _load_hf(path, step, overrides)
  return _load_ours(path, step, overrides)


def use_mesh(loaded: LoadedRun):
  """The mesh and logical rules the loaded model runs under (a context manager)."""
  return shd.use_mesh(loaded.mesh, shd.rules_from_config(loaded.config.mesh))
