"""Variables on disk: converted directories, training checkpoints (read side), the model-config
check.

Two formats hold `{'params', 'buffers'}`:
- a converted directory (`save_converted`): an orbax checkpoint in `variables/` plus a
  `solq_jax.json` marker with the model's architecture fields, written last, so a restore can
  tell a finished solq-jax directory from a foreign or unfinished one;
- a training run's `checkpoints/` directory, written by `solq_jax.training.checkpoint` with the
  layout named here (`TRAIN_FORMAT`, `TRAIN_ITEMS`): one `<step>/` per save holding the train
  state, the data iterator position and a json `meta` with the whole model config. This module
  only reads it, and never changes the directory (a training may be writing there).

`check_model_config` is the one comparison of a stored model config with the config in hand.
"""
import hashlib
import json
import logging
import os
import pathlib

import numpy as np

log = logging.getLogger(__name__)

MARKER_FILE = 'solq_jax.json'
VARIABLES_SUBDIR = 'variables'
FORMAT_NAME = 'solq-jax-variables'
FORMAT_VERSION = 1
TRAIN_FORMAT = 'solq-jax-train-v1'
TRAIN_ITEMS = ('state', 'data', 'meta')
# Model-config fields that decide the variables' shapes and meaning (a mask vector means
# nothing under another coder or mask size): loading variables for inference or as a starting
# point compares these; resuming a training compares every field.
ARCHITECTURE_FIELDS = (
    'backbone', 'backbone_norm', 'backbone_width', 'hidden_dim', 'nheads', 'enc_layers',
    'dec_layers', 'dim_feedforward', 'num_queries', 'num_classes', 'num_feature_levels',
    'enc_n_points', 'dec_n_points', 'with_box_refine', 'vector_hidden_dim', 'num_coeffs',
    'mask_coder', 'mask_size', 'with_masks', 'two_stage')


# Fields that choose how the same parameters are computed, not what they are: a run may resume
# under other values (a float32 CPU run continued in bfloat16 on GPUs with the Pallas core).
COMPUTE_FIELDS = ('dtype', 'attention_impl')


class ModelConfigMismatch(ValueError):
  """Stored variables were made for another model config."""


def model_config_dict(model_config) -> dict:
  """The model config section as plain JSON-able data (a ConfigDict or a mapping)."""
  if hasattr(model_config, 'to_json'):
    return json.loads(model_config.to_json())
  return json.loads(json.dumps(dict(model_config)))


def architecture(model_config) -> dict:
  return {k: v for k, v in model_config_dict(model_config).items() if k in ARCHITECTURE_FIELDS}


def _model_defaults() -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  return {f.name: f.default for f in dataclasses.fields(models.SOLQ)
          if f.name in models.MODEL_FIELDS}


def check_model_config(saved: dict, model_config, source, fields=ARCHITECTURE_FIELDS,
                       ignore=()) -> None:
  """Raises `ModelConfigMismatch` naming `source` and every differing field with its
  (stored, config) values. `fields`: the fields compared (None: every field of either side
  but those in `ignore`)."""
  current = model_config_dict(model_config)
  saved = dict(saved or {})
  # With `fields`, a field the record does not hold is not compared: directories converted
  # before a field joined ARCHITECTURE_FIELDS stay loadable.
  names = (set(saved) | set(current)) - set(ignore) if fields is None else set(fields) & set(saved)
  # A model field added after the record was written is not compared while it holds the
  # model's default: the run was made before the option existed, i.e. with it off.
  defaults = _model_defaults()
  names = {k for k in names if k in saved or k not in defaults or current.get(k) != defaults[k]}
  diff = {k: (saved.get(k), current.get(k)) for k in sorted(names)
          if saved.get(k) != current.get(k)}
  if diff:
    raise ModelConfigMismatch(
        f'{source} was made for another model config; (stored, config) differ in {diff}')


# -- converted directories ---------------------------------------------------------------------


def save_converted(directory, variables: dict, model_config) -> str:
  """Writes `variables` as an orbax checkpoint in a new `directory` (the marker file last, so
  an interrupted save is recognised as incomplete). Returns the absolute directory."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f'output directory {directory} exists and is not empty')
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, VARIABLES_SUBDIR), variables)
  checkpointer.wait_until_finished()
  meta = {'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'model': architecture(model_config)}
  with open(os.path.join(directory, MARKER_FILE), 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  return directory


def is_converted(directory) -> bool:
  return os.path.isfile(os.path.join(directory, MARKER_FILE))


def load_converted(directory, model_config=None) -> dict:
  """Restores a converted directory (numpy leaves); with `model_config`, checks its
  architecture fields first."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint directory not found: {directory}')
  marker = os.path.join(directory, MARKER_FILE)
  if not os.path.isfile(marker):
    raise ValueError(f'{directory} is not a solq-jax variables checkpoint (no {MARKER_FILE}; '
                     'it is foreign or its save did not finish). Convert official weights with '
                     '`python -m solq_jax.weights --checkpoint X.pth --config ... '
                     '--out DIR`.')
  try:
    with open(marker) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{marker} is unreadable ({e})') from e
  if meta.get('format') != FORMAT_NAME:
    raise ValueError(f'{marker} names format {meta.get("format")!r}, not {FORMAT_NAME!r}')
  if model_config is not None:
    check_model_config(meta.get('model'), model_config, f'checkpoint {directory}')
  try:
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_SUBDIR))
  except Exception as e:  # orbax raises several types for missing/corrupt files.
    raise ValueError(f'cannot restore {directory}: truncated or corrupt checkpoint '
                     f'({type(e).__name__}: {e})') from e
  return _to_numpy(restored)


# -- training checkpoints (read only) ----------------------------------------------------------


def is_train_step(path) -> bool:
  """A complete training-checkpoint step directory (`<step>/` with its items)."""
  path = pathlib.Path(path)
  return (path.name.isdigit() and path.is_dir() and (path / 'state').is_dir()
          and (path / 'meta' / 'metadata').is_file())


def train_steps(directory) -> list:
  """The complete steps of a training run's checkpoint directory, ascending."""
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if is_train_step(p))


def read_train_meta(step_dir) -> dict:
  path = pathlib.Path(step_dir) / 'meta' / 'metadata'
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {path}: {e}') from e
  if not isinstance(meta, dict) or meta.get('format') != TRAIN_FORMAT:
    raise ValueError(f'{step_dir} is not a solq-jax train checkpoint (meta: {meta!r:.200})')
  return meta


# The sha256 of every file of a training step, written into the step directory once orbax has
# committed the save (`write_train_checksums`) and checked before any restore: orbax itself
# does not notice flipped bits in its data files.
CHECKSUM_FILE = 'sha256.json'


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _step_files(step_dir: pathlib.Path) -> dict:
  return {p.relative_to(step_dir).as_posix(): p for p in sorted(step_dir.rglob('*'))
          if p.is_file() and p.name != CHECKSUM_FILE}


def write_train_checksums(step_dir) -> None:
  """Writes `<step>/sha256.json` for a committed step (atomically: a temporary file renamed)."""
  step_dir = pathlib.Path(step_dir)
  sums = {name: _sha256(p) for name, p in _step_files(step_dir).items()}
  tmp = step_dir / (CHECKSUM_FILE + '.tmp')
  tmp.write_text(json.dumps(sums, indent=0, sort_keys=True))
  os.replace(tmp, step_dir / CHECKSUM_FILE)


class CorruptCheckpoint(ValueError):
  """A training step whose files differ from the checksums written with it."""


def verify_train_checksums(step_dir) -> bool:
  """Raises CorruptCheckpoint naming the files of `step_dir` that are missing, changed or
  unreadable. False (nothing checked) for a step saved without checksums (older runs, or a
  process killed between the commit and the checksums)."""
  step_dir = pathlib.Path(step_dir)
  path = step_dir / CHECKSUM_FILE
  if not path.exists():
    return False
  try:
    expected = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CorruptCheckpoint(f'checkpoint {step_dir}: unreadable {CHECKSUM_FILE}: {e}') from None
  bad = []
  for name, digest in sorted(expected.items()):
    try:
      if _sha256(step_dir / name) != digest:
        bad.append(f'{name} (changed)')
    except FileNotFoundError:
      bad.append(f'{name} (missing)')
    except OSError as e:
      bad.append(f'{name} (unreadable: {e.strerror})')
  if bad:
    shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    raise CorruptCheckpoint(f'checkpoint {step_dir} is corrupt: {shown}')
  return True


def load_train_variables(path, model_config, use_ema: bool = False) -> dict:
  """`{'params', 'buffers'}` of a training checkpoint: a run's `checkpoints/` directory (its
  newest complete step) or one `<step>/` folder of it.

  `use_ema`: the parameters are the run's weight EMA (`ema_params` of the train state) when the
  checkpoint holds one; else, and without `use_ema`, the trained parameters.

  Restored onto this process's first device whatever mesh saved it (orbax needs a target when
  the topology differs), after checking the architecture fields. Reads only: an unfinished save
  of a running training is left alone.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(os.path.abspath(path))   # orbax metadata needs an absolute path
  if is_train_step(path):
    step_dir = path
  else:
    steps = train_steps(path)
    if not steps:
      raise ValueError(f'{path} holds no complete training checkpoint step')
    step_dir = path / str(steps[-1])
  verify_train_checksums(step_dir)
  meta = read_train_meta(step_dir)
  check_model_config(meta.get('model'), model_config, f'checkpoint {step_dir}')
  item = step_dir / 'state'
  try:
    reader = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          reader.metadata(item).item_metadata.tree)
    restored = reader.restore(item, target)
  except Exception as e:  # noqa: BLE001 - orbax raises many types; name the path
    raise ValueError(f'cannot restore {item}: {type(e).__name__}: {e}') from e
  params = restored['params']
  if use_ema and restored.get('ema_params') is not None:
    params = restored['ema_params']
    log.info('using the weight EMA of %s', step_dir)
  return _to_numpy({'params': params, 'buffers': restored['buffers']})


def _to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, tree)
