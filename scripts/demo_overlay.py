"""Draws docs/example_overlay_demo.png: the demo's predictions on the first six images of the
generated val split, side by side.

  .venv/bin/python scripts/demo_overlay.py [--checkpoint runs/demo/checkpoints] \\
      [--out docs/example_overlay_demo.png] [--config.eval.score_threshold=0.3]

Runs predict (solq_jax.inference.predict) with configs/demo.py on those images into a
temporary folder, then scales each overlay to a common height and joins them in a row.
"""
import argparse
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', default='runs/demo/checkpoints')
  p.add_argument('--out', default='docs/example_overlay_demo.png')
  p.add_argument('--images', type=int, default=6)
  p.add_argument('--height', type=int, default=256, help='pixel height of each overlay')
  args, overrides = p.parse_known_args()
  # pylint: disable=g-import-not-at-top
  from PIL import Image
  from solq_jax.ablation import variants as variants_lib
  from solq_jax.data import synthetic
  from solq_jax.inference import predict

  if any(not o.startswith('--config.') for o in overrides):
    raise SystemExit(f'unknown arguments {overrides} (expected --config.section.field=value)')
  try:
    config = variants_lib.load_config(
        str(REPO / 'configs' / 'demo.py'),
        [variants_lib.parse_override(o[len('--config.'):]) for o in overrides])
  except variants_lib.OverrideError as e:
    raise SystemExit(str(e)) from e
  root = pathlib.Path(synthetic.ensure_dataset(config.data))
  images = sorted((root / 'val2017').glob('*.jpg'))[:args.images]
  if not images:
    raise SystemExit(f'no val images in {root / "val2017"}')
  with tempfile.TemporaryDirectory() as tmp:
    predict.run(config, args.checkpoint, [str(i) for i in images], tmp)
    tiles = []
    for image in images:
      tile = Image.open(pathlib.Path(tmp) / f'{image.stem}.png').convert('RGB')
      tiles.append(tile.resize((round(tile.width * args.height / tile.height), args.height),
                               Image.Resampling.LANCZOS))
  gap = 8
  strip = Image.new('RGB', (sum(t.width for t in tiles) + gap * (len(tiles) - 1), args.height),
                    'white')
  x = 0
  for tile in tiles:
    strip.paste(tile, (x, 0))
    x += tile.width + gap
  strip.save(args.out)
  print(f'wrote {args.out} ({len(tiles)} images)')


if __name__ == '__main__':
  main()
