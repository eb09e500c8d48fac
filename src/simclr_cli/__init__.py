"""simclr-cli: SimCLR pretraining and embedding for a folder of images.

SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", https://arxiv.org/abs/2002.05709.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
