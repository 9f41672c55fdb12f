"""R50 train step at 512x512, batch 1: the official PyTorch SOLQ and ours (float32, bfloat16) in
one run, one after another on the same machine.

    python benchmarks/official_step.py --official ../SOLQ --torch_python ../torch_venv/bin/python

The official side runs in a child process of `--torch_python` (torch, torchvision and scipy;
nothing of the official code is copied here): the R50 model of `official_forward.py` in training
mode, its own `SetCriterion` with `HungarianMatcher` (costs 2/5/2, focal alpha 0.25, vector loss
on every decoder layer with coefficient 3 as the R50 script sets), AdamW with the backbone group
at lr 2e-5, gradient clipping at 0.1. Its vector targets are made inside the criterion (RoIAlign
crop of each matched mask, then a DCT), as the official training does; ours come from the input
pipeline, so our step does not include them. Both sides get 10 random objects per image (boxes
drawn alike; official masks: the filled boxes). One warm-up (ours: compile) step, then the median
of `--runs` steps.
"""
import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import official_forward  # noqa: E402  pylint: disable=g-import-not-at-top

_STEP = official_forward.OFFICIAL_MODEL + r'''
from models.matcher import HungarianMatcher
from models.solq import SetCriterion
model.train()
weights = {'loss_ce': 2, 'loss_bbox': 5, 'loss_giou': 2, 'loss_vector': 1}
weights.update({f'{k}_{i}': v for i in range(5) for k, v in list(weights.items())})
criterion = SetCriterion(91, HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2), weights,
                         ['labels', 'boxes', 'cardinality', 'masks'], focal_alpha=0.25,
                         with_vector=True, processor_dct=model.processor_dct,
                         vector_loss_coef=3.0, vector_start_stage=0)
backbone = [p for n, p in model.named_parameters() if 'backbone.0' in n and p.requires_grad]
rest = [p for n, p in model.named_parameters() if 'backbone.0' not in n and p.requires_grad]
optimizer = torch.optim.AdamW([{'params': rest, 'lr': 2e-4},
                               {'params': backbone, 'lr': 2e-5}], weight_decay=1e-4)
rng = torch.Generator().manual_seed(0)
n = 10
cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=rng)
wh = 0.05 + 0.25 * torch.rand(n, 2, generator=rng)
boxes = torch.cat([cxcy, wh], 1)
scale = torch.tensor([width, height, width, height], dtype=torch.float32)
xyxy = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) * scale
masks = torch.zeros(n, height, width, dtype=torch.bool)
for i, (x0, y0, x1, y1) in enumerate(xyxy.round().long().tolist()):
  masks[i, y0:y1, x0:x1] = True
targets = [{'labels': torch.randint(1, 91, (n,), generator=rng), 'boxes': boxes,
            'xyxy_boxes': xyxy, 'masks': masks}]
x = NestedTensor(torch.randn(1, 3, height, width, generator=rng),
                 torch.zeros(1, height, width, dtype=torch.bool))
times = []
for i in range(runs + 1):
  start = time.perf_counter()
  terms = criterion(model(x), targets)
  loss = sum(terms[k] * weights[k] for k in terms if k in weights)
  optimizer.zero_grad()
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
  optimizer.step()
  times.append(time.perf_counter() - start)
print(json.dumps({'first': times[0], 'times': times[1:], 'loss': float(loss),
                  'threads': torch.get_num_threads(), 'torch': torch.__version__}))
'''


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official', required=True, help='checkout of github.com/megvii-research/SOLQ')
  p.add_argument('--torch_python', required=True,
                 help='python with torch, torchvision and scipy')
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--runs', type=int, default=3)
  a = p.parse_args()
  base = official_forward.run_official(_STEP, a.official, a.torch_python, a.size, a.size,
                                       a.runs, f'R50 train step, batch 1 at {a.size}x{a.size}')
  import train_step  # pylint: disable=g-import-not-at-top  (imports jax via benchmarks/timing.py)
  from configs import solq_r50  # pylint: disable=g-import-not-at-top
  for dtype in ('float32', 'bfloat16'):
    config = solq_r50.get_config()
    config.model.dtype = dtype
    _, median, times, _, _ = train_step.measure(config, 1, 1, a.size, a.runs)
    official_forward.print_ours(dtype, base, median, times)


if __name__ == '__main__':
  main()
