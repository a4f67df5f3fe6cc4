"""Analysis numerics and figures: Paper I's least squares, principal components of grad f, run and study figures."""
