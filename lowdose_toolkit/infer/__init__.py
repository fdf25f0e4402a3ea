"""Inference: the Predictor, the precision setting, the sliding window, the batch pipeline and MIP previews.
"""
