"""Train checkpoints with orbax: periodic and final, async, `max_to_keep`, exact resume.

Each step directory holds three items: `state` (the TrainState pytree: params, buffers,
optimiser state, step, rng), `data` (the train iterator's position, JSON) and `meta` (format tag
and the model config, JSON). orbax writes a step into a temporary directory and renames it when
complete, so a process killed mid-save (even with SIGKILL) leaves only a temporary directory,
which is removed at the next start; the run resumes from the last complete step.

Every committed step also gets `sha256.json`, the checksums of its files
(`solq_jax.weights.store.write_train_checksums`), written once orbax has finished that save
(asynchronous saves finish in the background: the checksums follow at the next save, `wait` or
`close`), and verified before a restore, so flipped bits are an error naming the step and the
files. `resume_from_step` continues from an older step when the newest one is corrupt: the newer
steps are moved aside to `_discarded_step_<n>` (kept, never deleted).

A checkpoint directory that holds anything else (files that are not orbax step directories, a
step without our three items, a different model config, unreadable arrays) raises
`CheckpointError` naming the path: a run never silently restarts from scratch.
"""
import base64
import dataclasses
import logging
import os
import pathlib
from typing import Any, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from solq_jax.weights import store

log = logging.getLogger(__name__)

# The on-disk layout is shared with the read-only reader of `solq_jax.weights.store`.
FORMAT = store.TRAIN_FORMAT
ITEMS = store.TRAIN_ITEMS


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed from."""


def encode_iterator_state(state: Any) -> Any:
  """Iterator states may be bytes (grain); JSON needs text."""
  if isinstance(state, bytes):
    return {'bytes_b64': base64.b64encode(state).decode('ascii')}
  return {'value': state}


def decode_iterator_state(stored: Any) -> Any:
  if 'bytes_b64' in stored:
    return base64.b64decode(stored['bytes_b64'])
  return stored['value']


def state_items(state) -> Any:
  """The train state as the dict of its fields that orbax saves and restores. Without a weight
  EMA (`ema_params` None) the field is left out: orbax would record the None as an item, and a
  checkpoint written before the state had an EMA field (which lacks it) would no longer match."""
  if state is None or not dataclasses.is_dataclass(state):
    return state
  items = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  if items.get('ema_params', False) is None:
    del items['ema_params']
  return items


def _is_tmp(name: str) -> bool:
  return 'orbax-checkpoint-tmp' in name


class Checkpointer:
  """Saves and restores train checkpoints under `directory`."""

  def __init__(self, directory, model_config, *, max_to_keep: int = 3,
               async_save: bool = True, resume_from_step: int = 0):
    self.directory = pathlib.Path(directory).absolute()
    self.model_config = store.model_config_dict(model_config)
    self._check_foreign()
    self._unchecked = []   # saved steps whose checksums are not written yet
    if resume_from_step:
      self._discard_after(int(resume_from_step))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def _check_foreign(self) -> None:
    """Everything in an existing directory must be an orbax step directory (or its own files)."""
    if not self.directory.exists():
      return
    if not self.directory.is_dir():
      raise CheckpointError(f'checkpoint path {self.directory} exists and is not a directory')
    for entry in sorted(os.listdir(self.directory)):
      if _is_tmp(entry):
        continue  # an interrupted save; orbax removes it at start-up
      path = self.directory / entry
      if entry.isdigit() and path.is_dir():
        missing = [i for i in ITEMS if not (path / i).exists()]
        if missing:
          raise CheckpointError(
              f'{path} is not a solq-jax train checkpoint (missing {missing}); it is truncated or '
              'was written by another program. Remove it or use another --workdir.')
        continue
      if entry.startswith('_') or entry.startswith('.'):
        continue  # orbax's own metadata (e.g. _CHECKPOINT_METADATA)
      raise CheckpointError(
          f'{path} is not part of a solq-jax checkpoint directory; refusing to use '
          f'{self.directory} (a foreign or corrupted directory). Use another --workdir.')

  def _complete_steps(self):
    if not self.directory.is_dir():
      return []
    return sorted(int(e) for e in os.listdir(self.directory)
                  if e.isdigit() and (self.directory / e).is_dir())

  def _discard_after(self, step: int) -> None:
    """Moves the steps after `step` aside (train.resume_from_step), so `step` is resumed."""
    steps = self._complete_steps()
    if step not in steps:
      raise CheckpointError(f'train.resume_from_step={step}: no such step in {self.directory} '
                            f'(complete steps: {steps})')
    if jax.process_index() != 0:   # one process moves the folders; the others wait for it
      multihost_utils.sync_global_devices('solq_jax checkpoint: newer steps moved aside')
      return
    for later in (s for s in steps if s > step):
      target = self.directory / f'_discarded_step_{later}'
      n = 1
      while target.exists():
        target, n = self.directory / f'_discarded_step_{later}_{n}', n + 1
      os.rename(self.directory / str(later), target)
      log.warning('train.resume_from_step=%d: moved step %d aside to %s', step, later, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('solq_jax checkpoint: newer steps moved aside')

  def _write_checksums(self) -> None:
    """Checksums of the saves orbax has finished (called after `wait_until_finished`). Every
    process of a multi-process run shares the directory: process 0 alone writes them (orbax
    has committed the step, every process's files included, when its wait returns)."""
    if jax.process_index() != 0:
      self._unchecked = []
      return
    for step in self._unchecked:
      step_dir = self.directory / str(step)
      if step_dir.is_dir():   # max_to_keep may have removed it already
        store.write_train_checksums(step_dir)
    self._unchecked = []

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, iterator_state: Any, force: bool = False) -> bool:
    meta = {'format': FORMAT, 'step': int(step), 'model': self.model_config}
    self.wait()   # orbax waits for the previous save anyway; its checksums are written here
    self._unchecked.append(int(step))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_items(state)),
        data=ocp.args.JsonSave(encode_iterator_state(iterator_state)),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state) -> Tuple[Any, Any]:
    """(state, iterator_state) of `step`; raises CheckpointError when it is not ours or unreadable."""
    path = self.directory / str(step)
    try:
      store.verify_train_checksums(path)
    except store.CorruptCheckpoint as e:
      raise CheckpointError(f'{e}. {self._older_steps_hint(step)}') from None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the path
      raise CheckpointError(f'cannot read the metadata of checkpoint {path}: {e}') from e
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
      raise CheckpointError(f'{path} is not a solq-jax train checkpoint (meta: {meta!r:.200})')
    try:   # a resumed run continues only under the same model config (but its compute fields)
      store.check_model_config(meta.get('model'), self.model_config, f'checkpoint {path}',
                               fields=None, ignore=store.COMPUTE_FIELDS)
    except store.ModelConfigMismatch as e:
      raise CheckpointError(f'{e}; use another --workdir or the same model config') from None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state_items(abstract_state)),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
      raise CheckpointError(f'checkpoint {path} is truncated or does not match the train state: '
                            f'{type(e).__name__}: {first_line}. {self._older_steps_hint(step)}'
                            ) from e
    state = restored['state']
    if dataclasses.is_dataclass(abstract_state):
      state = abstract_state.replace(**state)
    return state, decode_iterator_state(restored['data'])

  def _older_steps_hint(self, step: int) -> str:
    older = [s for s in self._complete_steps() if s < step]
    if not older:
      return 'No older step to continue from; use another --workdir.'
    return (f'To continue from an older step, set --config.train.resume_from_step={older[-1]} '
            f'(older steps: {older}).')

  def restore_latest(self, abstract_state) -> Optional[Tuple[int, Any, Any]]:
    """(step, state, iterator_state) of the newest complete checkpoint, or None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    state, it_state = self.restore(step, abstract_state)
    return step, state, it_state

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_checksums()

  def close(self) -> None:
    self.wait()
    self.manager.close()
