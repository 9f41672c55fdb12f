"""Low-level array ops of the network (the multi-scale deformable-attention core)."""
from solq_jax.ops.ms_deform_attn import ms_deform_attn_core

__all__ = ['ms_deform_attn_core']
