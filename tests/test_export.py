"""The exported predictor: equal to the in-process model, runnable by the README's loader without
solq_jax, readable by predict.py, and strict about its inputs."""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from solq_jax import masks as masks_lib
from solq_jax import models
from solq_jax.inference import export as export_lib
from solq_jax.inference import predict
from solq_jax.inference import visualize

REPO = pathlib.Path(__file__).resolve().parents[1]
# One export of the tiny model (a few tens of seconds of lowering on 2 cores).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope='module')
def exported(tiny_config, tmp_path_factory):
  config = tiny_config.copy_and_resolve_references()
  config.data.eval_size, config.data.eval_max_size = 48, 64
  config.eval.export_hw = (64, 64)
  config.data.bucket_sizes = (64,)      # the model path pads as the export does
  config.eval.top_k = 10
  config.eval.score_threshold = 0.0
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.key(1))
  coder = masks_lib.build_coder(config.model)
  artifact, contract = export_lib.export(config, model, variables, coder,
                                         visualize.category_names(config))
  out_dir = tmp_path_factory.mktemp('exported')
  export_lib.save(out_dir, artifact, contract)
  infer = jax.jit(export_lib.inference_function(model, variables, coder, config.eval.top_k))
  return config, (model, variables), infer, out_dir


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 64, 64, 3)).astype(np.float32)
  pad_mask = np.zeros((n, 64, 64), bool)
  pad_mask[:, 48:] = True
  return images, pad_mask


def test_exported_equals_the_in_process_model_at_any_batch_size(exported):
  _, _, infer, out_dir = exported
  model = export_lib.ExportedModel(out_dir)
  assert set(model.exported.platforms) == {'cpu', 'cuda'}
  for n in (1, 3):
    images, pad_mask = _batch(n, seed=n)
    got, want = model(images, pad_mask), jax.device_get(infer(images, pad_mask))
    assert set(got) == set(export_lib.OUTPUTS)
    for k in export_lib.OUTPUTS:
      assert got[k].shape[0] == n
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
  contract = json.loads((out_dir / export_lib.CONTRACT_FILE).read_text())
  assert contract['inputs'][0]['shape'] == ['batch', 64, 64, 3]
  assert contract['class_names']['1'] == 'circle'       # the generated dataset's names


def test_wrong_inputs_are_named(exported):
  model = export_lib.ExportedModel(exported[3])
  images, pad_mask = _batch(2)
  with pytest.raises(ValueError, match=r'images must be float32 \[batch, 64, 64, 3\]'):
    model(images[:, :32], pad_mask)
  with pytest.raises(ValueError, match='pad_mask must be bool'):
    model(images, pad_mask.astype(np.float32))
  with pytest.raises(ValueError, match='different batch sizes'):
    model(images, pad_mask[:1])
  with pytest.raises(ValueError, match='not a readable solq-jax export'):
    export_lib.ExportedModel(exported[3].parent / 'missing')


def test_predict_reads_an_exported_directory(exported, tmp_path):
  """predict.py on the export gives the detections of predict.py on the model itself."""
  config, loaded, _, out_dir = exported
  image = tmp_path / 'shapes.png'
  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 255, (45, 60, 3), np.uint8)).save(image)
  from_model = predict.run(config, '', [image], tmp_path / 'model', loaded=loaded)
  from_export = predict.run(config, str(out_dir), [image], tmp_path / 'export')
  a, b = from_model[0]['detections'], from_export[0]['detections']
  assert len(a) == len(b) == 10
  for x, y in zip(a, b):
    assert x['category_id'] == y['category_id'] and x['query_index'] == y['query_index']
    assert x['score'] == pytest.approx(y['score'], abs=1e-6)
    np.testing.assert_allclose(x['box_xyxy'], y['box_xyxy'], atol=1e-3)
    assert x['segmentation'] == y['segmentation']


def _readme_loader():
  text = (REPO / 'README.md').read_text()
  found = re.search(r'```python\n(# load_exported\.py.*?)```', text, re.S)
  assert found, 'README has no loader example'
  return found.group(1)


def test_readme_loader_runs_without_solq_jax(exported, tmp_path):
  """The README's loader, run in a process where `import solq_jax` fails, reproduces the
  in-process model's scores and boxes (in pixels of the original image)."""
  config, _, infer, out_dir = exported
  loader = tmp_path / 'load_exported.py'
  loader.write_text(_readme_loader())
  image_path = tmp_path / 'photo.png'
  Image.fromarray(np.random.default_rng(6).integers(0, 255, (40, 70, 3), np.uint8)).save(
      image_path)
  blocker = ("import sys; sys.modules['solq_jax'] = None\n"
             "try:\n  import solq_jax\n  raise SystemExit('solq_jax importable')\n"
             "except ImportError:\n  pass\n"
             f"sys.argv = ['load_exported.py', {str(out_dir)!r}, {str(image_path)!r}]\n"
             f"exec(compile(open({str(loader)!r}).read(), 'load_exported.py', 'exec'))\n")
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  done = subprocess.run([sys.executable, '-c', blocker], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  detections = json.loads(done.stdout.strip().splitlines()[-1])
  image = Image.open(image_path).convert('RGB')
  images, pad_mask = predict.prepare_image(image, config.data, padded_hw=(64, 64))
  want = jax.device_get(infer(images, pad_mask))
  assert len(detections) == 10
  np.testing.assert_allclose([d['score'] for d in detections], want['scores'][0], rtol=1e-5)
  np.testing.assert_allclose([d['box'] for d in detections],
                             want['boxes'][0] * np.array([70, 40, 70, 40]), atol=1e-3)
  assert [d['label'] for d in detections] == want['labels'][0].tolist()


def test_unexportable_settings_are_refused_before_lowering(tiny_config):
  """The export's contract is the coder's bool box masks: a detection-only model and the soft
  decoding are refused by name (before any model is traced: None stands in for it)."""
  config = tiny_config.copy_and_resolve_references()
  config.eval.mask_decode = 'soft'
  with pytest.raises(ValueError, match="mask_decode='soft'"):
    export_lib.export(config, None, None, masks_lib.build_coder(config.model), [])
  config.eval.mask_decode = 'coder'
  config.model.with_masks = False
  with pytest.raises(ValueError, match='detection only'):
    export_lib.export(config, None, None, masks_lib.build_coder(config.model), [])
