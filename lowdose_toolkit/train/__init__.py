"""Training: the composition root, the loop, stages, validation, checkpoints, distribution and RNG state.
"""
