"""Training: ``flash-depth train`` / ``python -m flash_depth.train`` / ``torchrun -m flash_depth.train``."""
