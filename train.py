"""Dice-loss training of the Improved UNet: `python train.py` (see README.md)."""
