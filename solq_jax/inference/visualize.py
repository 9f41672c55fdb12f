"""Overlays of detections on images: instance masks, boxes, class names and scores; the
category names they show.

Masks and boxes are composed in numpy (exact, testable pixel sets); only the text labels are
rasterised with PIL's built-in bitmap font.
"""
import colorsys
import json
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from solq_jax.data import synthetic

# COCO 2017 category ids and names (the model's labels are the raw ids; 80 of 1..90 are used).
COCO_CATEGORIES = {
    1: 'person', 2: 'bicycle', 3: 'car', 4: 'motorcycle', 5: 'airplane', 6: 'bus', 7: 'train',
    8: 'truck', 9: 'boat', 10: 'traffic light', 11: 'fire hydrant', 13: 'stop sign',
    14: 'parking meter', 15: 'bench', 16: 'bird', 17: 'cat', 18: 'dog', 19: 'horse', 20: 'sheep',
    21: 'cow', 22: 'elephant', 23: 'bear', 24: 'zebra', 25: 'giraffe', 27: 'backpack',
    28: 'umbrella', 31: 'handbag', 32: 'tie', 33: 'suitcase', 34: 'frisbee', 35: 'skis',
    36: 'snowboard', 37: 'sports ball', 38: 'kite', 39: 'baseball bat', 40: 'baseball glove',
    41: 'skateboard', 42: 'surfboard', 43: 'tennis racket', 44: 'bottle', 46: 'wine glass',
    47: 'cup', 48: 'fork', 49: 'knife', 50: 'spoon', 51: 'bowl', 52: 'banana', 53: 'apple',
    54: 'sandwich', 55: 'orange', 56: 'broccoli', 57: 'carrot', 58: 'hot dog', 59: 'pizza',
    60: 'donut', 61: 'cake', 62: 'chair', 63: 'couch', 64: 'potted plant', 65: 'bed',
    67: 'dining table', 70: 'toilet', 72: 'tv', 73: 'laptop', 74: 'mouse', 75: 'remote',
    76: 'keyboard', 77: 'cell phone', 78: 'microwave', 79: 'oven', 80: 'toaster', 81: 'sink',
    82: 'refrigerator', 84: 'book', 85: 'clock', 86: 'vase', 87: 'scissors', 88: 'teddy bear',
    89: 'hair drier', 90: 'toothbrush',
}


def palette(n):
  """`n` distinct saturated colours, uint8 `[n,3]` (hues spaced by the golden ratio)."""
  hues = (np.arange(n) * 0.618033988749895) % 1.0
  rgb = [colorsys.hsv_to_rgb(h, 0.9, 0.95) for h in hues]
  return np.round(np.array(rgb, np.float64).reshape(n, 3) * 255).astype(np.uint8)


def blend_masks(image, masks, colors, alpha=0.5):
  """Tints every mask's pixels with its colour; pixels outside all masks are untouched.

  Args:
    image: uint8 `[H,W,3]`.
    masks: bool `[N,H,W]`, drawn in order (later ones on top).
    colors: uint8 `[N,3]`.
    alpha: weight of the colour.
  """
  out = image.astype(np.float32)
  for mask, color in zip(masks, colors):
    out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def box_outline(box_xyxy, image_hw, width=2):
  """bool `[H,W]`: a `width`-pixel rectangle along the inside of the box, clipped to the image."""
  h, w = image_hw
  x0, y0, x1, y1 = box_xyxy
  c0, r0 = int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h))
  c1, r1 = int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h))
  out = np.zeros((h, w), bool)
  if c1 <= c0 or r1 <= r0:
    return out
  out[r0:r1, c0:c1] = True
  out[min(r0 + width, r1):max(r1 - width, r0), min(c0 + width, c1):max(c1 - width, c0)] = False
  return out


def _draw_label(image, text, box_xyxy, color):
  """Writes `text` on a colour-filled strip above the box's top-left corner (inside if no room)."""
  pil = Image.fromarray(image)
  draw = ImageDraw.Draw(pil)
  font = ImageFont.load_default()
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  tw, th = right - left + 4, bottom - top + 2
  x = int(np.clip(box_xyxy[0], 0, max(image.shape[1] - tw, 0)))
  y = int(box_xyxy[1]) - th
  if y < 0:
    y = int(np.clip(box_xyxy[1], 0, max(image.shape[0] - th, 0)))
  draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=tuple(int(c) for c in color))
  luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
  ink = (0, 0, 0) if luminance > 128 else (255, 255, 255)
  draw.text((x + 2 - left, y + 1 - top), text, fill=ink, font=font)
  return np.asarray(pil)


def select(detections, score_threshold):
  """Indices of the detections with `score >= score_threshold`, lowest score first."""
  scores = np.asarray(detections['scores'])
  keep = np.nonzero(scores >= score_threshold)[0]
  return keep[np.argsort(scores[keep], kind='stable')]


def draw_detections(image, detections, names=None, score_threshold=0.3, alpha=0.5,
                    draw_boxes=True, draw_labels=True):
  """Overlay of one image's detections (a `postprocess` dict) on `image` (uint8 `[H,W,3]`).

  Detections below `score_threshold` are not drawn; higher scores are drawn on top. Each
  instance gets its own colour (by rank): its mask is tinted, its box outlined, and a label
  `name score` written above the box. Returns a new uint8 `[H,W,3]` array.
  """
  image = np.asarray(image, np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'image must be uint8 [H,W,3], got shape {image.shape}')
  names = COCO_CATEGORIES if names is None else names
  order = select(detections, score_threshold)
  colors = palette(len(order))[::-1]  # the best detection gets the first colour
  out = image
  if 'masks' in detections and len(order):
    masks = np.asarray(detections['masks'])[order]
    if masks.shape[1:] != image.shape[:2]:
      raise ValueError(f'masks are {masks.shape[1:]} but the image is {image.shape[:2]}')
    out = blend_masks(out, masks, colors, alpha)
  boxes = np.asarray(detections['boxes'])
  if draw_boxes:
    out = out.copy()
    for i, color in zip(order, colors):
      out[box_outline(boxes[i], image.shape[:2])] = color
  if draw_labels:
    labels, scores = np.asarray(detections['labels']), np.asarray(detections['scores'])
    for i, color in zip(order, colors):
      text = f'{names.get(int(labels[i]), str(int(labels[i])))} {scores[i]:.2f}'
      out = _draw_label(out, text, boxes[i], color)
  return out


def save_png(path, image):
  """Writes uint8 `[H,W,3]` as a PNG file."""
  Image.fromarray(np.asarray(image, np.uint8)).save(path, format='PNG')


def load_category_names(path=''):
  """`{category_id: name}`: COCO's 80 by default, else from a COCO json or a text file.

  A text file has one category per line, either `ID NAME` or just `NAME` (numbered from 1 in
  file order, as COCO-style ids); blank lines are ignored.
  """
  if not path:
    return dict(COCO_CATEGORIES)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'category names file not found: {path}')
  if path.endswith('.json'):
    with open(path) as f:
      try:
        categories = json.load(f)['categories']
        return {int(c['id']): str(c['name']) for c in categories}
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is not a COCO json with a `categories` list ({e!r})') from e
  names = {}
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  for number, line in enumerate(lines, start=1):
    head, _, rest = line.partition(' ')
    if head.isdigit() and rest.strip():
      names[int(head)] = rest.strip()
    else:
      names[number] = line
  return names


def category_names(config):
  """`{category id: name}` of `config`: `eval.names_file`, else COCO's for a dataset, else the
  generated dataset's shape names."""
  if config.eval.names_file or config.data.root or config.data.source != 'coco':
    return load_category_names(config.eval.names_file)
  return {c['id']: c['name'] for c in synthetic.CATEGORIES}
