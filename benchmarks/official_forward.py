"""R50 forward at 800x1066, batch 1: the official PyTorch SOLQ and ours (float32, bfloat16) in
one run, one after another on the same machine.

    python benchmarks/official_forward.py --official ../SOLQ --torch_python ../torch_venv/bin/python

The official model runs in a child process of `--torch_python` (an interpreter with torch and
torchvision; the official code is not a dependency of solq-jax and nothing of it is copied
here): built as its R50 flags define it (`--with_vector --with_box_refine`, hidden 384,
vector head 1024), random weights, eval mode, its pure-PyTorch deformable-attention core,
under `torch.no_grad()`. Both sides: one warm-up call, then the median of `--runs` calls.
"""
import argparse
import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

# Runs under the torch interpreter (argv: official checkout, height, width, runs): stands in for
# the official code's compiled and optional imports, then builds its R50 SOLQ as `model` (random
# weights). `benchmarks/official_step.py` appends its training step to the same text.
OFFICIAL_MODEL = r'''
import argparse, json, os, statistics, sys, time, types
import torch, torchvision
official, height, width, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torchvision.__version__ = '0.99.0'          # util/misc.py parses its first three characters
for name in ('MultiScaleDeformableAttention', 'cv2', 'pywt', 'matplotlib', 'matplotlib.pyplot',
             'detectron2', 'detectron2.structures', 'detectron2.layers', 'detectron2.utils',
             'detectron2.utils.memory'):
  sys.modules.setdefault(name, types.ModuleType(name))
unused = lambda *a, **k: None


class BitMasks:
  # detectron2's crop_and_resize: RoIAlign (aligned, one sample per bin) of each mask in its
  # box, thresholded at 0.5; only the training step's vector loss calls it.
  def __init__(self, tensor):
    self.tensor = tensor

  def crop_and_resize(self, boxes, size):
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], 1)
    out = torchvision.ops.roi_align(self.tensor[:, None].float(), rois, (size, size), 1.0, 0,
                                    aligned=True)
    return out[:, 0] >= 0.5


sys.modules['detectron2.structures'].BitMasks = BitMasks
sys.modules['detectron2.layers'].paste_masks_in_image = unused
sys.modules['detectron2.utils.memory'].retry_if_cuda_oom = lambda f: f
try:        # the step's matcher and DCT targets need scipy; the forward does not
  import scipy.fft, scipy.optimize, scipy.fftpack  # noqa: E401
  sys.modules['cv2'].dct = lambda x: scipy.fft.dctn(x, norm='ortho').astype(x.dtype)
except ImportError:
  for name in ('scipy', 'scipy.optimize', 'scipy.fftpack'):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules['scipy.optimize'].linear_sum_assignment = unused
  sys.modules['scipy.fftpack'].dct = sys.modules['scipy.fftpack'].idct = unused
resnet50 = torchvision.models.resnet50
torchvision.models.resnet50 = lambda pretrained=False, **kw: resnet50(weights=None, **kw)
sys.path.insert(0, official)
package = types.ModuleType('models')
package.__path__ = [os.path.join(official, 'models')]
sys.modules['models'] = package
from models.ops.functions import ms_deform_attn_func
from models.ops.modules import ms_deform_attn
class Core:
  @staticmethod
  def apply(value, shapes, level_start, locations, weights, im2col_step):
    return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)
ms_deform_attn.MSDeformAttnFunction = Core
from models.backbone import build_backbone
from models.deformable_transformer import DeformableTransformer
from models.solq import SOLQ
from models.dct import ProcessorDCT
from util.misc import NestedTensor
args = argparse.Namespace(hidden_dim=384, position_embedding='sine', lr_backbone=2e-5,
                          num_feature_levels=4, backbone='resnet50', dilation=False,
                          checkpoint=False, dcn=False, masks=True)
transformer = DeformableTransformer(d_model=384, nhead=8, num_encoder_layers=6,
    num_decoder_layers=6, dim_feedforward=1024, dropout=0.1, activation='relu',
    return_intermediate_dec=True, num_feature_levels=4, dec_n_points=4, enc_n_points=4,
    two_stage=False, two_stage_num_proposals=300)
model = SOLQ(build_backbone(args), transformer, num_classes=91, num_queries=300,
             num_feature_levels=4, aux_loss=True, with_box_refine=True, two_stage=False,
             with_vector=True, processor_dct=ProcessorDCT(256, 128), vector_hidden_dim=1024)
'''
_FORWARD = OFFICIAL_MODEL + r'''
model.eval()
torch.manual_seed(0)
x = NestedTensor(torch.randn(1, 3, height, width), torch.zeros(1, height, width, dtype=torch.bool))
times = []
with torch.no_grad():
  for i in range(runs + 1):
    start = time.perf_counter()
    model(x)
    times.append(time.perf_counter() - start)
print(json.dumps({'first': times[0], 'times': times[1:], 'threads': torch.get_num_threads(),
                  'torch': torch.__version__}))
'''


def ours(dtype, height, width, runs):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import solq_r50  # pylint: disable=g-import-not-at-top
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  config = solq_r50.get_config()
  config.model.dtype = dtype
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((1, height, width, 3)),
                       jnp.float32)
  pad = jnp.zeros((1, height, width), bool)
  forward = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
  t = timing.interleaved({dtype: lambda: forward(variables, images, pad)}, runs)[dtype]
  return t


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official', required=True, help='checkout of github.com/megvii-research/SOLQ')
  p.add_argument('--torch_python', required=True, help='python with torch and torchvision')
  p.add_argument('--height', type=int, default=800)
  p.add_argument('--width', type=int, default=1066)
  p.add_argument('--runs', type=int, default=3)
  a = p.parse_args()
  base = run_official(_FORWARD, a.official, a.torch_python, a.height, a.width, a.runs,
                      f'R50 forward, batch 1 at {a.height}x{a.width}')
  for dtype in ('float32', 'bfloat16'):
    t = ours(dtype, a.height, a.width, a.runs)
    print_ours(dtype, base, t.median, t.wall)


def run_official(code, official, torch_python, height, width, runs, title):
  """Runs `code` (OFFICIAL_MODEL + a timing tail) under `torch_python`, prints the table's
  head and the official row; returns the official median in seconds."""
  import statistics  # pylint: disable=g-import-not-at-top
  done = subprocess.run([torch_python, '-c', code, os.path.abspath(official), str(height),
                         str(width), str(runs)], check=False, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f'the official code failed:\n{done.stderr[-3000:]}')
  result = json.loads(done.stdout.strip().splitlines()[-1])
  base = statistics.median(result['times'])
  print(f'{title}, median of {runs} after one warm-up')
  print('| model | median s | runs s | vs official |\n|---|---|---|---|')
  print(f'| official PyTorch {result["torch"]} ({result["threads"]} threads) | {base:.2f} | '
        f'{", ".join(f"{t:.2f}" for t in result["times"])} | 1.00x |', flush=True)
  return base


def print_ours(dtype, base, median, times):
  print(f'| solq-jax {dtype} | {median:.2f} | {", ".join(f"{t:.2f}" for t in times)} | '
        f'{base / median:.2f}x faster |', flush=True)

if __name__ == '__main__':
  main()
