"""The network f(theta): an MLP with GELU activations predicting y = log10 f (paper section 2)."""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BiasMLP(nn.Module):
    """``n_in`` inputs -> ``depth`` hidden layers of ``width`` neurons -> 1 output y = log10 f."""

    def __init__(self, n_in: int, width: int = 64, depth: int = 5, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        layers, d = [], n_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), ACTIVATIONS[activation]()]
            d = width
        out = nn.Linear(d, 1)
        with torch.no_grad():  # f = 1 everywhere at the start: the integral constraint's flat point, no
            out.weight.zero_()  # random initial spread of y that f = 10^y would turn into spikes
            out.bias.zero_()
        layers.append(out)
        self.net = nn.Sequential(*layers)
        self.shape = {"n_in": n_in, "width": width, "depth": depth, "activation": activation}

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """y = log10 f of each row of ``theta`` (n, n_in) -> (n,)."""
        return self.net(theta).squeeze(-1)


def network_shape(n_in: int, model_cfg) -> dict:
    """The ``shape`` of :class:`BiasMLP` (its constructor's arguments) for ``n_in`` inputs and a
    ``model`` config section (width, depth, activation)."""
    return {"n_in": int(n_in), "width": model_cfg.width, "depth": model_cfg.depth, "activation": model_cfg.activation}


def build_model(shape: dict, seed: int, dtype=torch.float32) -> BiasMLP:
    """A freshly initialised network; the same ``seed`` gives the same weights on every rank."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    model = BiasMLP(**shape).to(dtype)
    torch.random.set_rng_state(gen_state)
    return model


def f_of_y(y: torch.Tensor) -> torch.Tensor:
    """f = 10^y."""
    return torch.pow(10.0, y)
