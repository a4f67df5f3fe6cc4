"""One workflow per command (train, lstsq, pca, study, ...): the collective body that a thin command module calls."""
