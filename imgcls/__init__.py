"""Shared core of the training and serving sides: model factory, preprocessing, artifact format."""

__version__ = "0.1.0"
