"""Training: per-cell sub-sampling and batches, the loss, the Fourier-space loss, the DDP loop, checkpoints and stopping."""
