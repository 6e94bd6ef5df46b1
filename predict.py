"""Segment new images with a trained checkpoint and score them: `python predict.py`."""
