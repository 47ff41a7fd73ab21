"""The VQGAN image tokenizer (Esser et al. 2021), shared by M6's text-to-image (M6 §4.1) and VLMo's masked image
modelling (VLMo §3.4, stage 1 predicts its codes as BEiT does): images <-> grids of discrete codes.

    model.py      config, the taming-based autoencoder + quantizer + discriminator, official checkpoint loading
    training.py   the loss as the one training loop takes it, reconstruction metrics, the ``vqgan-world`` (text-to-image) and ``vqgan-world-32`` (VLMo MIM) recipes
"""
from mmkit.vqgan import model, training  # noqa: F401  (registration)
