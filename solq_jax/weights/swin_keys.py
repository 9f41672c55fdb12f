"""The torch keys of a Swin backbone and where they land in the Flax tree (`convert` rules).

Two sources share the body's keys (`patch_embed.*`, `layers.{i}.blocks.{j}.*`,
`layers.{i}.downsample.*`): an official SOLQ Swin checkpoint (under `backbone.0.body.`, with the
output norms `norm1..3` of stages 2-4) and Microsoft's ImageNet classification checkpoints
(`swin_*_patch4_window7_*.pth`, no prefix, no output norms; their classifier `head.*`, final
`norm.*` and the stored shift masks `attn_mask` are ignored, as the official `init_weights`
loads them with strict=False and leaves the output norms at their init).

Every `relative_position_index` buffer must be present and equal to the index this code
computes for the window (it is a constant here, not a variable).
"""
from solq_jax.models import swin

# Keys of a Microsoft ImageNet checkpoint that the backbone does not use.
IMAGENET_IGNORED_PREFIXES = ('head.', 'norm.')
IMAGENET_IGNORED_SUFFIXES = ('.attn_mask',)


def imagenet_ignored(key: str) -> bool:
  return key.startswith(IMAGENET_IGNORED_PREFIXES) or key.endswith(IMAGENET_IGNORED_SUFFIXES)


def add_swin(plan, name: str, prefix: str, output_norms: bool = True) -> None:
  """Adds the rules of the Swin variant `name` with torch keys under `prefix` to `plan` (a
  `convert._Plan`); `output_norms`: the SOLQ body's `norm1..3` (absent from ImageNet files)."""
  embed_dim, depths, heads, _ = swin.swin_layout(name)
  p, ws = swin.PATCH_SIZE, swin.WINDOW_SIZE
  index = swin.relative_position_index(ws)
  plan.conv(f'{prefix}patch_embed.proj.weight', 'backbone/patch_embed/proj', (embed_dim, 3, p, p))
  plan.add(f'{prefix}patch_embed.proj.bias', (embed_dim,),
           ('params/backbone/patch_embed/proj/bias', lambda x: x))
  plan.norm(f'{prefix}patch_embed.norm', 'backbone/patch_embed/norm', embed_dim)
  for i, (depth, n_heads) in enumerate(zip(depths, heads)):
    dim = embed_dim * 2 ** i
    for j in range(depth):
      t, f = f'{prefix}layers.{i}.blocks.{j}', f'backbone/layers_{i}/blocks_{j}'
      plan.norm(f'{t}.norm1', f'{f}/norm1', dim)
      plan.add(f'{t}.attn.relative_position_bias_table', ((2 * ws - 1) ** 2, n_heads),
               (f'params/{f}/attn/relative_position_bias_table', lambda x: x))
      plan.constant(f'{t}.attn.relative_position_index', index)
      plan.linear(f'{t}.attn.qkv', f'{f}/attn/qkv', 3 * dim, dim)
      plan.linear(f'{t}.attn.proj', f'{f}/attn/proj', dim, dim)
      plan.norm(f'{t}.norm2', f'{f}/norm2', dim)
      plan.linear(f'{t}.mlp.fc1', f'{f}/mlp/fc1', swin.MLP_RATIO * dim, dim)
      plan.linear(f'{t}.mlp.fc2', f'{f}/mlp/fc2', dim, swin.MLP_RATIO * dim)
    if i < len(depths) - 1:
      t, f = f'{prefix}layers.{i}.downsample', f'backbone/layers_{i}/downsample'
      plan.norm(f'{t}.norm', f'{f}/norm', 4 * dim)
      plan.linear(f'{t}.reduction', f'{f}/reduction', 2 * dim, 4 * dim, bias=False)
  if output_norms:
    for i in swin.OUT_INDICES:
      plan.norm(f'{prefix}norm{i}', f'backbone/norm{i}', embed_dim * 2 ** i)
