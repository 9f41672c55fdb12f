"""The variants of an ablation: config overrides from the command line, their cartesian product,
and what a variant needs before it can train (a fitted PCA / dictionary file, the flatten
coder's vector length).

An override is `section.field=value` with the value parsed as `--config.section.field=value`
is by ml_collections (the field's own type: '1' for an int, '(1, 2)' for a tuple, 'pca' for a
string), so a variant is exactly the run `train.py --config BASE --config.<override> ...` trains.
"""
import dataclasses
import itertools
import logging
import pathlib
import re
from typing import List, Sequence, Tuple

from absl import flags
from ml_collections import config_flags

from solq_jax import cli

log = logging.getLogger(__name__)


class OverrideError(ValueError):
  """A bad `--vary` / `--set` override or base config (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run: the varied overrides (which name it) on top of the fixed ones."""
  varied: Tuple[Tuple[str, str], ...]

  @property
  def label(self):
    """The table's row label: the values (one varied key) or `key=value` pairs."""
    if len(self.varied) == 1:
      return self.varied[0][1]
    return ', '.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in self.varied)

  @property
  def slug(self):
    """The variant's work-directory name under the output folder."""
    text = '__'.join(f'{k}={v}' for k, v in self.varied)
    return re.sub(r'[^\w.=+-]', '_', text)


def parse_override(text: str) -> Tuple[str, str]:
  key, sep, value = text.partition('=')
  if not sep or not re.fullmatch(r'\w+(\.\w+)+', key):
    raise OverrideError(f'expected section.field=value, got {text!r}')
  return key, value


def parse_vary(texts: Sequence[str]) -> List[Variant]:
  """`['model.mask_coder=dct,pca', 'loss.vector_loss_scale=1,3']` -> the product's variants,
  first key outermost. A value holding commas itself (a tuple) is written with ';' between the
  variants' values: `data.train_scales=(64, 80);(96,)`."""
  axes = []
  for text in texts:
    key, values = parse_override(text)
    parts = [v.strip() for v in (values.split(';') if ';' in values else values.split(','))]
    if not all(parts):
      raise OverrideError(f'--vary {text!r}: an empty value')
    axes.append([(key, v) for v in parts])
  if not axes:
    raise OverrideError('give at least one --vary section.field=v1,v2')
  return [Variant(tuple(combo)) for combo in itertools.product(*axes)]


def load_config(base: str, overrides: Sequence[Tuple[str, str]]):
  """The config of `base` (a config file) with `overrides` applied as `--config.k=v` flags."""
  fv = flags.FlagValues()
  argv = ['ablate', f'--config={base}'] + [f'--config.{k}={v}' for k, v in overrides]
  holder = config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)
  try:
    fv(argv)
    config = holder.value
    config.keys()   # a config file that fails to import raises here, not later
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, ImportError, OSError,
          SyntaxError) as e:
    raise OverrideError(f'{base} with {[f"{k}={v}" for k, v in overrides]}: '
                        f'{cli.describe_error(e, argv)}') from e
  return config


def _fit_coder_file(config, kind: str, path: pathlib.Path, max_instances: int):
  """Fits the PCA or the dictionary of `kind` on the training split's box crops -> `path`."""
  from solq_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.masks import fit_pca  # pylint: disable=g-import-not-at-top
  from solq_jax.masks import pca  # pylint: disable=g-import-not-at-top
  from solq_jax.masks import sparse  # pylint: disable=g-import-not-at-top
  source = data_lib.build_source(config, config.data.train_split)
  crops = fit_pca.coco_crops(str(source.ann_file), config.model.mask_size, max_instances)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + '.partial.npz')
  if kind == 'pca':
    pca.save_pca(tmp, pca.fit_pca(crops, config.model.num_coeffs))
  else:
    sparse.save_dictionary(tmp, sparse.fit_dictionary(crops, config.model.num_coeffs))
  tmp.replace(path)
  log.info('fitted the %s coder on %d crops -> %s', kind, len(crops), path)


def prepare(config, coder_dir: pathlib.Path, max_instances: int = 4000) -> List[str]:
  """Completes a variant's config in place; returns notes for the table.

  - `mask_coder='flatten'` whose `num_coeffs != mask_size**2`: num_coeffs becomes mask_size**2
    (the flatten vector is the whole crop); with the default `loss.vector_loss='l1'` the loss
    becomes 'l2+dice' (the paper: "L2 and dice loss jointly"; set another to keep it).
  - `mask_coder='pca'` / `'sparse'` without a file: fitted once on the training split (the
    data the variant trains on) into `coder_dir`, named by mask size and length, and reused.
  """
  m = config.model
  notes = []
  if not m.with_masks:
    return notes
  if m.mask_coder == 'flatten' and m.num_coeffs != m.mask_size ** 2:
    notes.append(f'num_coeffs {m.num_coeffs} -> {m.mask_size ** 2} (mask_size**2)')
    m.num_coeffs = m.mask_size ** 2
  if m.mask_coder == 'flatten' and config.loss.vector_loss == 'l1':
    notes.append('loss.vector_loss l1 -> l2+dice (the paper trains flatten with both)')
    config.loss.vector_loss = 'l2+dice'
  field = {'pca': 'pca_path', 'sparse': 'sparse_path'}.get(m.mask_coder)
  if field and not m[field]:
    path = coder_dir / f'{m.mask_coder}_{m.mask_size}x{m.num_coeffs}.npz'
    if not path.exists():
      _fit_coder_file(config, m.mask_coder, path, max_instances)
    m[field] = str(path)
    notes.append(f'fitted on the training split ({path.name})')
  return notes
