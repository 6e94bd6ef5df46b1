"""The Improved UNet of Isensee et al. 2017 (arXiv:1802.10508), in 2D."""
