"""The train state: (model, optimizer) created already sharded, or only its shapes.

``nnx.eval_shape`` gives the abstract state, the logical axes give its shardings, and a
jitted initializer with ``out_shardings`` writes each shard where it lives: no
parameter is ever materialised whole on one device (nanodo's ``_init_train_state``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from research import batch_ramp as ramp_lib
from research import checkpoint as ckpt_lib
from research import sharding as shd
from research.config import ConfigError
from research.optim import make_optimizer
from research.tasks import Task


@dataclasses.dataclass
class TrainState:
  """What the loop carries: the NNX graph definition and the (sharded) state."""
  graphdef: Any
  state: Any  # nnx.State of (model, optimizer)
  shardings: Any
  schedule: optax.Schedule


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
  """Fills model.vocab_size=0 from the tokenizer; refuses a vocab the model can't hold."""
  if config.model.vocab_size == 0:
    config.model.vocab_size = tokenizer_vocab
  elif tokenizer_vocab > config.model.vocab_size:
    raise ConfigError(
        f'the tokenizer has {tokenizer_vocab} tokens but model.vocab_size='
        f'{config.model.vocab_size}; set model.vocab_size>={tokenizer_vocab} or 0 (auto).')


def _state_factory(config: ml_collections.ConfigDict, task: Task):
  tx, schedule = make_optimizer(config.optimizer, config.steps,
                                lr_factor=ramp_lib.lr_factor(config))

  def create():
    model = task.build_model()
    return model, nnx.Optimizer(model, tx, wrt=task.trainable)

  return create, schedule


def _shaped_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, task: Task):
  """(create, schedule, rules, graphdef, abstract state, shardings); allocates nothing."""
  create, schedule = _state_factory(config, task)
  rules = shd.rules_from_config(config.mesh)
  with shd.use_mesh(mesh, rules):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = shd.state_shardings(abstract_state, mesh, rules)
  return create, schedule, rules, graphdef, abstract_state, shardings


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         task: Task) -> TrainState:
  """Shapes, dtypes and shardings of the train state; allocates nothing (AOT planning)."""
  _, schedule, _, graphdef, abstract_state, shardings = _shaped_state(config, mesh, task)
  abstract = ckpt_lib.abstract_with_shardings(abstract_state, shardings)
  return TrainState(graphdef, abstract, shardings, schedule)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       task: Task) -> TrainState:
  """Creates (model, optimizer) already sharded: eval_shape -> shardings -> jit init."""
  create, schedule, rules, graphdef, _, shardings = _shaped_state(config, mesh, task)
  with shd.use_mesh(mesh, rules):
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
  return TrainState(graphdef, state, shardings, schedule)
