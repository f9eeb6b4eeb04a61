"""Serving: the Multi Model Server handler (through sagemaker-inference) and its `serve` entry."""
