"""Per-object tiles: the CPU path of the crop and the paste.

Dense batched code does `[B, H, W]` work, although an object only touches the pixels around its
box. On CPU it is faster to loop over objects and work on a square tile holding the box's region,
with the tile side picked per object from a few static sizes (`lax.switch`), so every branch has
static shapes (`tiled_loop`, the crop). The paste uses `strip_loop`: a column band of a static
width, filled in strips of rows, which covers the region more tightly. Results are identical to the dense code: the same per-pixel arithmetic, and the
pixels outside the region are provably untouched (crop) or below threshold (paste).
"""
import jax
import jax.numpy as jnp
import numpy as np

# Square tile sides; a region larger than the last one uses the whole image axis.
TILE_SIZES = (64, 128, 256, 512)


def resolve_impl(impl):
  """'auto' -> 'tiled' on CPU, 'dense' on accelerators; checks the name."""
  if impl == 'auto':
    return 'tiled' if jax.default_backend() == 'cpu' else 'dense'
  if impl not in ('dense', 'tiled'):
    raise ValueError(f"mask crop/paste impl must be 'auto', 'dense' or 'tiled', got {impl!r}")
  return impl


def box_region(lo, hi, length):
  """`[floor(lo) - 1, ceil(hi) + 1)` clipped to `[0, length)` (either box orientation) ->
  (start, extent) int32. This is detectron2's CPU paste region; it also holds every pixel an
  aligned RoIAlign sample of the box can read."""
  a, b = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
  finite = jnp.isfinite(a) & jnp.isfinite(b)
  start = jnp.where(finite, jnp.clip(jnp.floor(a) - 1, 0, length), 0).astype(jnp.int32)
  stop = jnp.where(finite, jnp.clip(jnp.ceil(b) + 1, 0, length), 0).astype(jnp.int32)
  return start, stop - start


def box_region_np(lo, hi, length):
  """Numpy version of `box_region` -> (start, stop) int arrays."""
  a, b = np.minimum(lo, hi), np.maximum(lo, hi)
  finite = np.isfinite(a) & np.isfinite(b)
  start = np.where(finite, np.clip(np.floor(np.where(finite, a, 0)) - 1, 0, length), 0)
  stop = np.where(finite, np.clip(np.ceil(np.where(finite, b, 0)) + 1, 0, length), 0)
  return start.astype(np.int64), stop.astype(np.int64)


def tiled_loop(boxes, image_hw, make_branch, init):
  """`for i: out = branch_i(out, i, oy, ox)` where branch_i works on a `(th, tw)` tile at (oy, ox).

  Args:
    boxes: `[B,4]` xyxy.
    image_hw: static (H, W) of the array the tiles index.
    make_branch: `(th, tw) -> fn(out, i, oy, ox) -> out`, for static tile shapes.
    init: the initial carry (e.g. the zero output).
  """
  if boxes.shape[0] == 0:
    return init
  height, width = image_hw
  longest = max(height, width)
  sides = [t for t in TILE_SIZES if t < longest] + [longest]
  y_start, y_extent = box_region(boxes[:, 1], boxes[:, 3], height)
  x_start, x_extent = box_region(boxes[:, 0], boxes[:, 2], width)
  bucket = jnp.searchsorted(jnp.asarray(sides), jnp.maximum(y_extent, x_extent))

  def branch(side):
    tile_h, tile_w = min(side, height), min(side, width)
    fn = make_branch(tile_h, tile_w)

    def run(out, i):
      oy = jnp.clip(y_start[i], 0, height - tile_h)
      ox = jnp.clip(x_start[i], 0, width - tile_w)
      return fn(out, i, oy, ox)
    return run

  branches = [branch(side) for side in sides]
  return jax.lax.fori_loop(0, boxes.shape[0],
                           lambda i, out: jax.lax.switch(bucket[i], branches, out, i), init)


# Widths of the column band of `strip_loop` (then the whole axis); rows go in strips.
BAND_WIDTHS = (64, 128, 192, 256, 384, 512, 768)


def strip_loop(boxes, image_hw, prepare, write_strip, init, strip_height=64):
  """`for i: state = prepare(i, ox, tw); for each strip: out = write_strip(out, state, i, oy, ox)`.

  Finer than `tiled_loop` (about 4x fewer pixels for COCO-like boxes): object `i`'s region is
  covered by a column band of static width `tw` (the smallest of `BAND_WIDTHS` holding it,
  picked by `lax.switch`) at column `ox`, cut into `ceil(rows / strip_height)` strips of
  `strip_height` rows starting at row `oy` (clipped to the image, so the last strip may overlap
  the previous one). `prepare` runs once per object (e.g. the column pass of the paste).

  Args:
    boxes: `[B,4]` xyxy.
    image_hw: static (H, W) of the array the strips index.
    prepare: `(i, ox, tw) -> state` for a static band width `tw`.
    write_strip: `(out, state, i, oy, ox, th) -> out` for a static strip height `th`.
    init: the initial carry (e.g. the zero output).
    strip_height: static rows per strip.
  """
  if boxes.shape[0] == 0:
    return init
  height, width = image_hw
  sides = [t for t in BAND_WIDTHS if t < width] + [width]
  strip_h = min(strip_height, height)
  y_start, y_extent = box_region(boxes[:, 1], boxes[:, 3], height)
  x_start, x_extent = box_region(boxes[:, 0], boxes[:, 2], width)
  bucket = jnp.searchsorted(jnp.asarray(sides), x_extent)

  def branch(band_w):
    def run(out, i):
      ox = jnp.clip(x_start[i], 0, width - band_w)
      state = prepare(i, ox, band_w)

      def body(k, out):
        oy = jnp.clip(y_start[i] + k * strip_h, 0, height - strip_h)
        return write_strip(out, state, i, oy, ox, strip_h)
      return jax.lax.fori_loop(0, (y_extent[i] + strip_h - 1) // strip_h, body, out)
    return run

  branches = [branch(side) for side in sides]
  return jax.lax.fori_loop(0, boxes.shape[0],
                           lambda i, out: jax.lax.switch(bucket[i], branches, out, i), init)
