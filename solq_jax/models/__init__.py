"""The SOLQ network in Flax Linen: `build_model(config.model)` is the one adapter from config."""
import dataclasses

from solq_jax.models.solq import SOLQ, count_params, init_variables

# SOLQ fields that are not model-config fields: `remat` is how a training run computes its
# gradients (`config.train.remat`), not a property of the model or its checkpoints.
NON_CONFIG_FIELDS = ('parent', 'name', 'remat')
# The SOLQ fields, read from the model config section of the same names.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(SOLQ)
                     if f.name not in NON_CONFIG_FIELDS)


def build_model(model_config, remat: str = 'none') -> SOLQ:
  """The SOLQ module of a `model` config section (`config.model`).

  Use as `module.apply(variables, images, pad_mask, train=False)`; variables are
  `{'params': ..., 'buffers': ...}` (from `init_variables(module, rng)`). `remat`: the
  training's `config.train.remat` ('none' | 'encoder' | 'decoder' | 'all'); it changes how the
  backward pass is computed, never the parameters or the values.
  """
  if 'model' in model_config:
    raise ValueError('build_model takes the model section (config.model), not the whole config')
  missing = [k for k in MODEL_FIELDS if k not in model_config]
  if missing:
    raise ValueError(f'config.model lacks the fields {missing}')
  return SOLQ(**{k: model_config[k] for k in MODEL_FIELDS}, remat=remat)


__all__ = ['SOLQ', 'MODEL_FIELDS', 'build_model', 'count_params', 'init_variables']
