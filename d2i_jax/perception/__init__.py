"""Perception heads on frozen Stable Diffusion features: feature fusion and task decoders (NHWC, Flax Linen)."""
