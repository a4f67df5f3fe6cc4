"""The bias model: features of the initial density, particle routing, the true field, orthogonalisation, the network and ensemble, evaluation."""
