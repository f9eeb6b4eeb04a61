"""The training report: rules over a run's debugger tensors and profile, and one HTML page (`launch.py report`)."""
