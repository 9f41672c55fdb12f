"""Line charts of a metric against the training step, drawn with Pillow (already a dependency:
matplotlib is not one, and a few axes, ticks and polylines do not justify adding it)."""
import math

from PIL import Image
from PIL import ImageDraw

# Distinct colours (Tableau 10), one per series in order.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PANEL_W, PANEL_H = 480, 360
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 56, 16, 32, 40


def nice_ticks(high, count=5):
  """About `count` round tick values from 0 to at least `high` (> 0)."""
  raw = high / max(count, 1)
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
  return [i * step for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _label(value):
  return f'{value:g}' if abs(value) >= 1 or value == 0 else f'{value:.3g}'


def draw_panel(draw, origin, title, series, y_label, x_label='step'):
  """One chart at `origin` (x, y): `series` = [(name, [(step, value), ...]), ...]; series with
  no points are listed in the legend only."""
  ox, oy = origin
  left, top = ox + MARGIN_L, oy + MARGIN_T
  right, bottom = ox + PANEL_W - MARGIN_R, oy + PANEL_H - MARGIN_B
  points = [p for _, pts in series for p in pts]
  x_ticks = nice_ticks(max([s for s, _ in points] + [1]))
  y_ticks = nice_ticks(max([v for _, v in points] + [1e-3]))
  x_max, y_max = x_ticks[-1], y_ticks[-1]

  def to_px(step, value):
    return (left + (right - left) * step / x_max, bottom - (bottom - top) * value / y_max)

  draw.text((ox + PANEL_W // 2, oy + 8), title, fill='black', anchor='mt')
  for t in x_ticks:
    x, _ = to_px(t, 0)
    draw.line([(x, top), (x, bottom)], fill=(230, 230, 230))
    draw.text((x, bottom + 6), _label(t), fill='black', anchor='mt')
  for t in y_ticks:
    _, y = to_px(0, t)
    draw.line([(left, y), (right, y)], fill=(230, 230, 230))
    draw.text((left - 6, y), _label(t), fill='black', anchor='rm')
  draw.rectangle([left, top, right, bottom], outline='black')
  draw.text(((left + right) // 2, bottom + 22), x_label, fill='black', anchor='mt')
  draw.text((ox + 4, top - 14), y_label, fill='black')
  for i, (name, pts) in enumerate(series):
    color = PALETTE[i % len(PALETTE)]
    xy = [to_px(s, v) for s, v in sorted(pts)]
    if len(xy) > 1:
      draw.line(xy, fill=color, width=2)
    for x, y in xy:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    ly = top + 8 + 14 * i
    draw.line([(left + 8, ly), (left + 24, ly)], fill=color, width=3)
    draw.text((left + 30, ly), name, fill='black', anchor='lm')


def save_chart(path, panels, x_label='step'):
  """Writes a PNG of panels side by side: `panels` = [(title, series, y_label), ...]."""
  image = Image.new('RGB', (PANEL_W * len(panels), PANEL_H), 'white')
  draw = ImageDraw.Draw(image)
  for i, (title, series, y_label) in enumerate(panels):
    draw_panel(draw, (i * PANEL_W, 0), title, series, y_label, x_label)
  image.save(path, format='PNG')
