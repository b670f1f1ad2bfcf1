"""melanoma: train, check and serve CNN classifiers for dermoscopic skin-lesion images, with a melanoma alert."""

__version__ = "0.1.0"
