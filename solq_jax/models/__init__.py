"""The SOLQ network in Flax Linen: `build_model(config)` is the public entry point."""
import ml_collections

from solq_jax.models.solq import SOLQ, count_params, init_variables

_REQUIRED = ('backbone', 'hidden_dim', 'nheads', 'enc_layers', 'dec_layers', 'dim_feedforward',
             'dropout', 'num_queries', 'num_classes', 'num_feature_levels', 'enc_n_points',
             'dec_n_points', 'with_box_refine', 'vector_hidden_dim', 'num_coeffs',
             'attention_impl')


def build_model(config) -> SOLQ:
  """The SOLQ module for a whole experiment `config` (reads `config.model`).

  Use as `module.apply(variables, images, pad_mask, train=False)`; variables are
  `{'params': ..., 'buffers': ...}` (from `module.init(rng, images, pad_mask)`, or faster
  from `init_variables(module, rng)`).
  """
  if 'model' not in config:
    raise ValueError('build_model expects the whole experiment config (with a `model` section)')
  missing = [k for k in _REQUIRED if k not in config.model]
  if missing:
    raise ValueError(f'config.model lacks the fields {missing}')
  return SOLQ(ml_collections.FrozenConfigDict(config.model))


__all__ = ['SOLQ', 'build_model', 'count_params', 'init_variables']
