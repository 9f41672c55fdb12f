"""The training loop: data -> sharded step -> metrics, checkpoints, periodic COCO evaluation.

    trainer = Trainer(config)                 # mesh, model, data, optimiser, compiled step
    result = trainer.fit(workdir, evaluation=...)   # resumes from workdir/checkpoints if present

A `Trainer` can `fit` several work directories (tests reuse its compiled step). A run is a pure
function of (config, step): the batch of step s comes from the data pipeline's step s, the
dropout key is fold_in(rng, s), so a run resumed from a checkpoint continues exactly.
"""
import contextlib
import json
import logging
import pathlib
import time
from typing import Any, Callable, Dict, Optional

import jax

from solq_jax import data as data_lib
from solq_jax import denoising
from solq_jax import losses
from solq_jax import masks
from solq_jax import models
from solq_jax import sharding
from solq_jax import weights
from solq_jax.training import checkpoint as checkpoint_lib
from solq_jax.training import distributed
from solq_jax.training import lock as lock_lib
from solq_jax.training import metrics as metrics_lib
from solq_jax.training import optimizer as optimizer_lib
from solq_jax.training import state as state_lib
from solq_jax.training import step as step_lib

log = logging.getLogger(__name__)


# (variables, out_dir) -> metrics dict with a flat 'summary', or None when skipped.
Evaluation = Callable[[Dict[str, Any], Any], Optional[Dict[str, Any]]]


class NonFiniteLossError(FloatingPointError):
  """A NaN or inf loss: the run stops; the last good checkpoint is kept."""


class Trainer:
  """Everything a run needs that does not depend on the work directory."""

  def __init__(self, config, mesh=None, variables=None):
    """`variables`: optional step-0 `{'params', 'buffers'}` (default: as `config.model` says)."""
    self.config = config
    t = config.train
    self.mesh = mesh if mesh is not None else sharding.make_mesh(t.num_devices)
    sharding.check_batch_size(t.batch_size, self.mesh)
    step_lib.check_grad_accum(t.grad_accum_steps, t.batch_size, self.mesh.size)
    step_lib.check_ema_decay(t.ema_decay)
    self.model = models.build_model(config.model, remat=config.train.remat)
    self.coder = masks.build_coder(config.model)   # one per run: data, criterion, evaluation
    self.criterion = losses.criterion_from_config(
        config.loss, self.coder, config.model.dec_layers, config.model.with_masks)
    self.denoiser = denoising.denoiser_from_config(config)
    self.data = data_lib.train_pipeline(config, self.coder)
    self.steps_per_epoch = self.data.steps_per_epoch
    self.total_steps = int(t.total_steps) or int(t.epochs) * self.steps_per_epoch
    if self.total_steps > len(self.data):  # a longer run than `epochs` covers: extend the data
      self.data = data_lib.train_pipeline(
          config, self.coder, num_epochs=-(-self.total_steps // self.steps_per_epoch))
    self.stop_step = min(int(t.stop_at_step) or self.total_steps, self.total_steps)
    key = jax.random.PRNGKey(config.seed)
    self.init_key, self.train_key = jax.random.split(key)
    self._variables = None if variables is None else jax.device_get(variables)
    self._state_template = None
    self._train_step = None
    self.tx = None

  # -- state ---------------------------------------------------------------------------------

  def initial_state(self) -> state_lib.TrainState:
    """Step-0 state (random, pretrained backbone or init checkpoint), replicated on the mesh."""
    if self._variables is None:  # computed once, kept on the host (states are donated)
      self._variables = jax.device_get(
          weights.initial_variables(self.config.model, self.model, self.init_key))
    if self.tx is None:
      self.tx = optimizer_lib.build_optimizer(
          self.config.train, self._variables['params'], self.steps_per_epoch,
          self.config.model.backbone_frozen_stages)
    variables = self._variables
    state = state_lib.create(variables, self.tx, self.train_key,
                             ema=bool(self.config.train.ema_decay))
    self._state_template = sharding.abstract_state(state, self.mesh)
    return sharding.replicate(state, self.mesh)

  @property
  def train_step(self):
    if self._train_step is None:
      if self._state_template is None:
        raise RuntimeError('call initial_state() before train_step')
      schedule = optimizer_lib.group_schedules(self.config.train, self.steps_per_epoch)
      self._train_step = step_lib.make_train_step(
          self.model, self.tx, self.mesh, self.criterion, schedule[optimizer_lib.DEFAULT],
          grad_accum_steps=self.config.train.grad_accum_steps,
          ema_decay=self.config.train.ema_decay, denoiser=self.denoiser)
    return self._train_step

  def checkpointer(self, workdir) -> checkpoint_lib.Checkpointer:
    t = self.config.train
    return checkpoint_lib.Checkpointer(pathlib.Path(workdir) / 'checkpoints', self.config.model,
                                       max_to_keep=t.max_to_keep,
                                       async_save=t.async_checkpointing,
                                       resume_from_step=t.resume_from_step)

  # -- the loop ------------------------------------------------------------------------------

  def _record_label_map(self, workdir):
    """Writes the dataset-label -> class-index mapping of sources that remap labels (TFDS)
    next to the checkpoints, so a checkpoint's class indices can be read back."""
    label_map = getattr(self.data.source, 'label_map', None)
    if label_map is not None:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / 'label_map.json').write_text(json.dumps(label_map(), indent=1))

  @staticmethod
  def _stop_if_nonfinite(step, scalars, ckpt) -> None:
    """Raises NonFiniteLossError when the loss, the gradient norm or the updated parameters
    of `step` are not finite (pops the step's parameter flag from `scalars`). Runs before the
    step is saved, so every checkpoint on disk holds finite parameters."""
    bad = metrics_lib.nonfinite(scalars)
    if scalars.pop(step_lib.PARAMS_FINITE, 1.0) != 1.0:
      bad['updated parameters'] = 'non-finite'
    if not bad:
      return
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f'the last good checkpoint is step {last} in {ckpt.directory} (its parameters are '
             'finite)' if last is not None else f'no checkpoint was saved in {ckpt.directory}')
    raise NonFiniteLossError(
        f'non-finite values at step {step}: {bad}. The run stopped without saving this step; '
        f'{where}. Lower train.lr (or check the data) and resume with '
        'train.resume_from_step.')

  def fit(self, workdir, stop_at_step: int = 0,
          evaluation: Optional[Evaluation] = None) -> Dict[str, Any]:
    """`_fit` under the work directory's lock (`training.lock`): a second run on the same
    directory is refused before it touches a checkpoint (its start-up would remove the first
    run's save in progress)."""
    held = (lock_lib.WorkdirLock(workdir) if distributed.is_main_process()
            else contextlib.nullcontext())
    with held:
      return self._fit(workdir, stop_at_step, evaluation)

  def _fit(self, workdir, stop_at_step: int = 0,
           evaluation: Optional[Evaluation] = None) -> Dict[str, Any]:
    """Trains from the newest checkpoint in `workdir` (or from scratch) up to the stop step
    (`stop_at_step`, else `train.stop_at_step`, else the end).

    `evaluation(variables, out_dir) -> metrics dict or None` runs every `train.eval_every_steps`
    and at the end (`train.final_eval`), on the weight EMA when the run keeps one and
    `eval.use_ema`, else on the parameters; train.py passes COCO evaluation
    (`solq_jax.inference.evaluate.make_evaluation`). None: no evaluation.

    Returns dict(state, step, history (per-step metrics of this call), eval (or None)).
    """
    t = self.config.train
    stop = min(stop_at_step, self.total_steps) if stop_at_step else self.stop_step
    workdir = pathlib.Path(workdir)
    main = distributed.is_main_process()
    state = self.initial_state()
    ckpt = self.checkpointer(workdir)
    try:
      restored = ckpt.restore_latest(self._state_template)
    except checkpoint_lib.CheckpointError:
      ckpt.close()
      raise
    writer = metrics_lib.MetricWriter(workdir, enabled=main)
    if main:
      self._record_label_map(workdir)
    iterator = self.data.iterator()
    start = 0
    if restored is not None:
      start, state, iterator_state = restored
      iterator.set_state(iterator_state)
      writer.truncate_after(start)
      log.info('resumed from step %d of %s', start, ckpt.directory)
    history, result_eval = [], None
    bar = metrics_lib.ProgressBar(stop, start, enabled=t.progress_bar and main)
    try:
      step = start
      batch = next(iterator) if step < stop else None
      tick, tick_step = time.time(), step
      # Seconds spent training in this call (compile included, evaluations excluded): the x axis
      # of AP-against-time comparisons (benchmarks/convergence.py).
      started, eval_seconds = tick, 0.0
      while step < stop:
        state, metrics = self.train_step(
            state, sharding.shard_batch(data_lib.train_device_batch(batch), self.mesh))
        step += 1
        data_state = iterator.get_state()  # positioned at batch `step`: what a resume needs
        batch = next(iterator) if step < stop else None  # overlaps the device step
        scalars = metrics_lib.to_floats(jax.device_get(metrics))
        self._stop_if_nonfinite(step, scalars, ckpt)
        history.append(scalars)
        if step % t.log_every_steps == 0 or step == stop:
          now = time.time()
          scalars['images_per_s'] = (step - tick_step) * t.batch_size / max(now - tick, 1e-9)
          scalars['train_seconds'] = now - started - eval_seconds
          tick, tick_step = now, step
          writer.write(step, scalars)
          bar.update(step, metrics_lib.format_losses(scalars))
        if step % t.checkpoint_every_steps == 0 or step == stop:
          ckpt.save(step, state, data_state)
        if (evaluation and t.eval_every_steps and step % t.eval_every_steps == 0
            and step < self.total_steps):
          ckpt.wait()
          eval_start = time.time()
          ev = evaluation(state.eval_variables(self.config.eval.use_ema),
                          workdir / 'eval' / str(step))
          if ev is not None:
            writer.write(step, dict(ev['summary'], train_seconds=eval_start - started - eval_seconds),
                         prefix='eval')
          eval_seconds += time.time() - eval_start
      bar.close()
      ckpt.wait()
      trained_seconds = time.time() - started - eval_seconds if step > start else 0.0
      if evaluation and t.final_eval and step == self.total_steps:
        result_eval = evaluation(state.eval_variables(self.config.eval.use_ema),
                                 workdir / 'eval' / str(step))
        if result_eval is not None:
          writer.write(step, dict(result_eval['summary'], train_seconds=trained_seconds),
                       prefix='eval')
          s = result_eval['summary']
          print(f'step {step}: box AP {s["bbox/AP"]:.4f}' +
                (f', mask AP {s["segm/AP"]:.4f}' if 'segm/AP' in s else ''), flush=True)
    finally:
      ckpt.close()
      writer.close()
    return dict(state=state, step=step, history=history, eval=result_eval)
