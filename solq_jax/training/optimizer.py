"""The official SOLQ optimiser recipe in optax (spec section 6).

AdamW with decoupled weight decay on every trained parameter, three learning-rate groups chosen
by parameter path, frozen parameters that never change, the global-norm clip over the trained
gradients, and a step decay of every group's rate at `lr_drop_epoch`.

Groups (by the parameter-tree contract of `solq_jax.models`):
  frozen       the backbone stem (params/backbone/conv1, bn1) and params/backbone/layer{1..k}_*
               with k = `model.backbone_frozen_stages` (official: 1; 0 = none): never updated,
               excluded from the clip norm (the official code sets requires_grad=False on them).
  backbone     the rest of params/backbone: `train.lr_backbone`.
  linear_proj  any path through `sampling_offsets` or `reference_points`: `lr * lr_linear_proj_mult`.
  default      everything else: `train.lr`.
The FrozenBN constants live in the `buffers` collection and never reach the optimiser.
"""
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import optax

FROZEN = 'frozen'
BACKBONE = 'backbone'
LINEAR_PROJ = 'linear_proj'
DEFAULT = 'default'
GROUPS = (FROZEN, BACKBONE, LINEAR_PROJ, DEFAULT)

_LINEAR_PROJ_NAMES = ('sampling_offsets', 'reference_points')


def _path_names(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _frozen_backbone_module(name: str, frozen_stages: int) -> bool:
  if name in ('conv1', 'bn1'):  # the stem
    return frozen_stages >= 1
  stage = name[len('layer'):].split('_')[0] if name.startswith('layer') else ''
  return stage.isdigit() and int(stage) <= frozen_stages


def group_of(names: tuple, frozen_stages: int = 1) -> str:
  """The parameter group of one parameter, from its path in the `params` collection."""
  if names and names[0] == 'backbone':
    if len(names) > 1 and _frozen_backbone_module(names[1], frozen_stages):
      return FROZEN
    return BACKBONE
  if any(n in _LINEAR_PROJ_NAMES for n in names):
    return LINEAR_PROJ
  return DEFAULT


def param_labels(params, frozen_stages: int = 1) -> Any:
  """A pytree like `params` holding each leaf's group name (`frozen_stages`: see the module
  docstring; pass `config.model.backbone_frozen_stages`)."""
  if 'backbone' not in params:
    raise ValueError(
        'the parameter tree has no top-level "backbone" entry, so the optimiser cannot find the '
        f'frozen and backbone groups (top-level keys: {sorted(params)})')
  return jax.tree_util.tree_map_with_path(
      lambda p, _: group_of(_path_names(p), frozen_stages), params)


def trainable_mask(params, frozen_stages: int = 1) -> Any:
  """A pytree of bools like `params`: True where the parameter is trained."""
  return jax.tree.map(lambda g: g != FROZEN, param_labels(params, frozen_stages))


def step_decay_schedule(base_lr: float, drop_step: int, factor: float) -> optax.Schedule:
  """`base_lr` until update `drop_step` (exclusive), then `base_lr * factor` (torch StepLR, once)."""
  def schedule(count):
    return base_lr * jnp.where(count >= drop_step, factor, 1.0)
  return schedule


class EmptyState(NamedTuple):
  """The (empty) state of the stateless transformations below."""


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6)).

  (optax.clip_by_global_norm omits the 1e-6, which moves clipped updates by ~1e-5 relative.)
  """
  def init(params):
    del params
    return EmptyState()

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(init, update)


def zero_frozen(labels) -> optax.GradientTransformation:
  """Zeroes the gradients of the frozen group (so they neither move nor count in the clip)."""
  def init(params):
    del params
    return EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g, l: jnp.zeros_like(g) if l == FROZEN else g,
                        updates, labels), state

  return optax.GradientTransformation(init, update)


def group_schedules(train_config, spe: int) -> Dict[str, Callable]:
  """The learning-rate schedule of each trained group, with the step decay in optimiser steps."""
  t = train_config
  drop = int(t.lr_drop_epoch * spe)
  return {
      DEFAULT: step_decay_schedule(t.lr, drop, t.lr_drop_factor),
      BACKBONE: step_decay_schedule(t.lr_backbone, drop, t.lr_drop_factor),
      LINEAR_PROJ: step_decay_schedule(t.lr * t.lr_linear_proj_mult, drop, t.lr_drop_factor),
  }


def build_optimizer(train_config, params, spe: int,
                    frozen_stages: int = 1) -> optax.GradientTransformation:
  """zero frozen grads -> clip (torch rule) -> per-group AdamW; frozen group: set_to_zero.

  `frozen_stages`: `config.model.backbone_frozen_stages` (the official model: 1)."""
  t = train_config
  labels = param_labels(params, frozen_stages)
  schedules = group_schedules(t, spe)

  def adamw(schedule):
    return optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                       weight_decay=t.weight_decay)

  transforms = {name: adamw(s) for name, s in schedules.items()}
  transforms[FROZEN] = optax.set_to_zero()
  parts = [zero_frozen(labels)]
  if t.clip_max_norm > 0:
    parts.append(clip_by_global_norm_torch(t.clip_max_norm))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts)
