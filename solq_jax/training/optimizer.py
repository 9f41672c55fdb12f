"""The official SOLQ optimiser recipe in optax.

AdamW with decoupled weight decay on every trained parameter, three learning-rate groups chosen
by parameter path, frozen parameters that never change, the global-norm clip over the trained
gradients, and a step decay of every group's rate at `lr_drop_epoch` (after an optional linear
warm-up over `warmup_steps`; 0 = none, as the official code). `lr_schedule='cosine'` replaces
the step decay by a cosine decay of every group's rate from its base value (after the warm-up)
to `lr_drop_factor` of it at the run's last step.

Groups (by the parameter-tree contract of `solq_jax.models`):
  frozen       the backbone modules `solq_jax.models.backbone.frozen_module` names: the stem
               (params/backbone/conv1, bn1) and params/backbone/layer{1..k}_* with
               k = `model.backbone_frozen_stages` (official: 1; 0 = none): never updated and
               excluded from the clip norm (the official code sets requires_grad=False on them;
               the backbone stops their gradients with the same rule). Swin backbones: the
               official Swin `frozen_stages` rule (`solq_jax.models.swin`; -1 = none).
  backbone     the rest of params/backbone: `train.lr_backbone`.
  linear_proj  any path through `sampling_offsets` or `reference_points`: `lr * lr_linear_proj_mult`.
  default      everything else: `train.lr`.
The FrozenBN constants live in the `buffers` collection and never reach the optimiser.
"""
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import optax

from solq_jax.models import backbone as backbone_lib

FROZEN = 'frozen'
BACKBONE = 'backbone'
LINEAR_PROJ = 'linear_proj'
DEFAULT = 'default'
GROUPS = (FROZEN, BACKBONE, LINEAR_PROJ, DEFAULT)

_LINEAR_PROJ_NAMES = ('sampling_offsets', 'reference_points')


def _path_names(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def group_of(names: tuple, frozen_stages: int = 1) -> str:
  """The parameter group of one parameter, from its path in the `params` collection."""
  if names and names[0] == 'backbone':
    if len(names) > 1 and backbone_lib.frozen_module(names[1], frozen_stages):
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


def step_decay_schedule(base_lr: float, drop_step: int, factor: float,
                        warmup_steps: int = 0) -> optax.Schedule:
  """`base_lr` until update `drop_step` (exclusive), then `base_lr * factor` (torch StepLR, once).

  `warmup_steps` > 0 ramps the rate linearly first: update `count` (0-based) uses
  `(count + 1) / warmup_steps` of it, so the first update is already nonzero and update
  `warmup_steps - 1` uses the full rate.
  """
  def schedule(count):
    rate = base_lr * jnp.where(count >= drop_step, factor, 1.0)
    if warmup_steps > 0:
      rate = rate * jnp.minimum(1.0, (count + 1.0) / warmup_steps)
    return rate
  return schedule


def cosine_decay_schedule(base_lr: float, total_steps: int, floor: float,
                          warmup_steps: int = 0) -> optax.Schedule:
  """`base_lr` decayed along a half cosine to `base_lr * floor` at update `total_steps - 1`,
  after the same linear warm-up as `step_decay_schedule` (the cosine starts after it)."""
  span = max(int(total_steps) - int(warmup_steps) - 1, 1)

  def schedule(count):
    progress = jnp.clip((count - warmup_steps) / span, 0.0, 1.0)
    rate = base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    if warmup_steps > 0:
      rate = rate * jnp.minimum(1.0, (count + 1.0) / warmup_steps)
    return rate
  return schedule


LR_SCHEDULES = ('step', 'cosine')


class EmptyState(NamedTuple):
  """The (empty) state of the stateless transformations below."""


def clip_by_global_norm_torch(max_norm: float, labels=None) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6)).

  The norm is over the trained parameters only: with `labels` (a pytree of group names like the
  updates), the frozen group's leaves do not count, as torch clips only the parameters that
  require a gradient. (optax.clip_by_global_norm omits the 1e-6, which moves clipped updates by
  ~1e-5 relative.)
  """
  def init(params):
    del params
    return EmptyState()

  def trained(updates):
    if labels is None:
      return updates
    return [g for g, l in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)) if l != FROZEN]

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(trained(updates))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(init, update)


def group_schedules(train_config, steps_per_epoch: int) -> Dict[str, Callable]:
  """The learning-rate schedule of each trained group in optimiser steps: the step decay at
  `lr_drop_epoch`, or (`lr_schedule='cosine'`) the cosine over the run's length
  (`total_steps`, else `epochs * steps_per_epoch`, as the loop counts it)."""
  t = train_config
  warmup = int(t.warmup_steps)
  if warmup < 0:
    raise ValueError(f'config.train.warmup_steps={warmup} must be >= 0 (0 = no warm-up)')
  if t.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f'config.train.lr_schedule={t.lr_schedule!r} is not one of {LR_SCHEDULES}')
  if t.lr_schedule == 'cosine':
    total = int(t.total_steps) or int(t.epochs) * int(steps_per_epoch)
    def make(base):
      return cosine_decay_schedule(base, total, t.lr_drop_factor, warmup)
  else:
    drop = int(t.lr_drop_epoch * steps_per_epoch)
    def make(base):
      return step_decay_schedule(base, drop, t.lr_drop_factor, warmup)
  return {DEFAULT: make(t.lr), BACKBONE: make(t.lr_backbone),
          LINEAR_PROJ: make(t.lr * t.lr_linear_proj_mult)}


def build_optimizer(train_config, params, steps_per_epoch: int,
                    frozen_stages: int = 1) -> optax.GradientTransformation:
  """clip (torch rule, trained groups) -> per-group AdamW; frozen group: set_to_zero.

  `frozen_stages`: `config.model.backbone_frozen_stages` (the official model: 1)."""
  t = train_config
  labels = param_labels(params, frozen_stages)
  schedules = group_schedules(t, steps_per_epoch)

  def adamw(schedule):
    return optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                       weight_decay=t.weight_decay)

  transforms = {name: adamw(s) for name, s in schedules.items()}
  transforms[FROZEN] = optax.set_to_zero()
  parts = []
  if t.clip_max_norm > 0:
    parts.append(clip_by_global_norm_torch(t.clip_max_norm, labels))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts)
