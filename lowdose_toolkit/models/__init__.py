"""The networks the engine composes: the synthesis model (generator, heads, guidance, refiner) and the VGG16
features of the perceptual loss.
"""
