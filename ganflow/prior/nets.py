"""Generator and critic networks for WGAN-GP priors, rebuilt from a plain architecture dict.

Two families, chosen from the field shape by `default_arch`:

- ``conv`` for square 2-D fields ``[n, n]`` with ``n`` a power of two in ``[16, 256]``. The generator maps
  ``z [B, k]`` through a linear layer to ``[B, c_0, 4, 4]`` and then ``L = log2(n / 4)`` blocks of
  (nearest upsample x2, 3x3 conv, LeakyReLU(0.2)) to ``[B, c_L, n, n]``, and a 3x3 conv to one channel.
  Channels ``c_i = min(8 b, b 2^(L - i))`` with ``b = base_channels``, so depth follows the field size.
  The critic mirrors it: a 3x3 conv, ``L`` blocks of (4x4 conv stride 2, layer norm, LeakyReLU(0.2)) and a
  linear read-out of the ``[c_0, 4, 4]`` features.
- ``mlp`` for 1-D fields ``[d]``: ``depth`` hidden layers of width ``hidden``, LeakyReLU(0.2), in both nets.

The critic has no batch norm: the WGAN-GP penalty ``(||grad_x D(x)|| - 1)^2`` is per sample, and batch norm
would couple the samples of a batch (Gulrajani et al. 2017, sec. 4). Layer norm (``GroupNorm(1, C)``,
per sample over ``C, H, W``) is used instead.

The networks work on normalised fields; `PriorGenerator` wraps a generator net with the data normalisation so
its output is in physical units. Every size comes from the ``arch`` dict (none from code defaults), so a
checkpoint rebuilds the same networks whatever the defaults of a later version.

Example:
    >>> import torch
    >>> arch = default_arch((32, 32), latent_dim=8, base_channels=4)
    >>> G, D = build_generator_net(arch), build_critic(arch)
    >>> D(G(torch.zeros(2, 8))).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GanflowError

__all__ = [
    "ARCH_KINDS",
    "default_arch",
    "check_arch",
    "build_generator_net",
    "set_clamp",
    "build_critic",
    "PriorGenerator",
]

ARCH_KINDS = ("conv", "mlp")
OUTPUT_KINDS = ("linear", "tanh")
_ARCH_KEYS = {
    "conv": ("kind", "latent_dim", "field_shape", "base_channels", "max_channels", "n_up"),
    "mlp": ("kind", "latent_dim", "field_shape", "hidden", "depth"),
}


def default_arch(
    field_shape,
    latent_dim: int,
    base_channels: int = 32,
    mlp_hidden: int = 256,
    mlp_depth: int = 3,
    output: str = "linear",
    critic_mbstd: bool = False,
) -> dict:
    """The architecture dict for fields of ``field_shape`` (plain types, stored verbatim in checkpoints)."""
    arch = _default_arch(field_shape, latent_dim, base_channels, mlp_hidden, mlp_depth)
    if output not in OUTPUT_KINDS:
        raise GanflowError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    if output != "linear":  # older checkpoints have no key: a linear read-out
        arch["output"] = output
    if critic_mbstd:  # older checkpoints have no key: no minibatch feature
        if arch["kind"] != "conv":
            raise GanflowError("train.critic_mbstd needs a convolutional prior (2-D fields)")
        arch["critic_mbstd"] = True
    return arch


def set_clamp(arch: dict, clamp: float | None) -> dict:
    """Set (or with None remove) the clip of a tanh read-out to ``[-clamp, clamp]``, ``0 < clamp <= 1``.

    A tanh reaches the range's ends only asymptotically, so a level that a large share of the pixels sit at
    exactly (the phantoms' zero background) gets faint noise about it; with a widened tanh (``tanh_margin``)
    clipped back to the data's range the level is an atom the generator reaches at finite pre-activations.
    The clip has no parameters, so a checkpoint trained without it can continue with it (`--resume`).
    """
    if clamp is None:
        arch.pop("clamp", None)
        return arch
    arch["clamp"] = float(clamp)
    _check_clamp(arch)
    return arch


def _check_clamp(arch: dict) -> None:
    c = arch["clamp"]
    if arch.get("output") != "tanh" or not isinstance(c, float) or not (0 < c <= 1):
        raise GanflowError(f"a read-out clamp needs output 'tanh' and a number in (0, 1], got {c!r}")


def _default_arch(field_shape, latent_dim, base_channels, mlp_hidden, mlp_depth) -> dict:
    shape = tuple(int(s) for s in field_shape)
    if latent_dim < 1:
        raise GanflowError(f"latent_dim must be >= 1, got {latent_dim}")
    if len(shape) == 1:
        if shape[0] < 2:
            raise GanflowError(f"1-D fields need at least 2 values, got field_shape {shape}")
        return {
            "kind": "mlp",
            "latent_dim": int(latent_dim),
            "field_shape": list(shape),
            "hidden": int(mlp_hidden),
            "depth": int(mlp_depth),
        }
    if len(shape) == 2:
        n = shape[0]
        if shape[0] != shape[1] or n < 16 or n > 256 or n & (n - 1):
            raise GanflowError(
                f"the convolutional prior needs square fields [n, n] with n a power of two in 16..256, "
                f"got field_shape {shape}"
            )
        if base_channels < 1:
            raise GanflowError(f"base_channels must be >= 1, got {base_channels}")
        return {
            "kind": "conv",
            "latent_dim": int(latent_dim),
            "field_shape": list(shape),
            "base_channels": int(base_channels),
            "max_channels": 8 * int(base_channels),
            "n_up": int(math.log2(n // 4)),
        }
    raise GanflowError(
        f"no prior architecture for {len(shape)}-D fields (field_shape {shape}); use 1-D or 2-D fields"
    )


def check_arch(arch) -> dict:
    """Validate a stored architecture dict (kind and keys); a bad one is a `GanflowError`."""
    if not isinstance(arch, dict) or arch.get("kind") not in ARCH_KINDS:
        raise GanflowError(f"checkpoint architecture is not one of {ARCH_KINDS}: {arch!r}"[:200])
    missing = [k for k in _ARCH_KEYS[arch["kind"]] if k not in arch]
    if missing:
        raise GanflowError(f"checkpoint architecture lacks key(s): {', '.join(missing)}")
    if arch.get("output", "linear") not in OUTPUT_KINDS:
        raise GanflowError(f"checkpoint architecture output is not one of {OUTPUT_KINDS}: {arch['output']!r}")
    if "clamp" in arch:
        _check_clamp(arch)
    return arch


def _channels(arch: dict) -> list[int]:
    b, cmax, L = arch["base_channels"], arch["max_channels"], arch["n_up"]
    return [min(cmax, b * 2 ** (L - i)) for i in range(L + 1)]


class _ConvGeneratorNet(nn.Module):
    """``[B, k] -> [B, n, n]`` (normalised units)."""

    def __init__(self, arch: dict):
        super().__init__()
        ch = _channels(arch)
        self.c0 = ch[0]
        self.fc = nn.Linear(arch["latent_dim"], ch[0] * 16)
        blocks = []
        for i in range(arch["n_up"]):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch[i], ch[i + 1], 3, padding=1),
                nn.LeakyReLU(0.2),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(ch[-1], 1, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = nn.functional.leaky_relu(self.fc(z), 0.2).view(z.shape[0], self.c0, 4, 4)
        return self.out(self.blocks(h)).squeeze(1)


class _MinibatchStd(nn.Module):
    """ProGAN's minibatch standard deviation (Karras, Aila, Laine & Lehtinen 2018): one more feature map holding
    the mean over features of their sd across groups of ``group`` samples, so the critic sees how varied a batch
    is and can penalise a generator whose draws vary less than the data."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, h: Tensor) -> Tensor:
        B, _, H, W = h.shape
        g = min(self.group, B)
        while B % g:
            g -= 1
        sd = (h.reshape(g, B // g, *h.shape[1:]).var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
        return torch.cat([h, sd.repeat(g)[:, None, None, None].expand(B, 1, H, W)], 1)


class _ConvCritic(nn.Module):
    """``[B, n, n] -> [B, 1]``; per-sample layer norm, no batch norm (gradient penalty is per sample), and with
    ``critic_mbstd`` the minibatch sd feature before the read-out."""

    def __init__(self, arch: dict):
        super().__init__()
        ch = _channels(arch)
        layers = [nn.Conv2d(1, ch[-1], 3, padding=1), nn.LeakyReLU(0.2)]
        for i in range(arch["n_up"], 0, -1):
            layers += [
                nn.Conv2d(ch[i], ch[i - 1], 4, stride=2, padding=1),
                nn.GroupNorm(1, ch[i - 1]),
                nn.LeakyReLU(0.2),
            ]
        mbstd = bool(arch.get("critic_mbstd", False))
        if mbstd:
            layers.append(_MinibatchStd())
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear((ch[0] + int(mbstd)) * 16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x.unsqueeze(1)).flatten(1))


def _mlp(n_in: int, n_out: int, hidden: int, depth: int) -> nn.Sequential:
    layers, width = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def build_generator_net(arch: dict) -> nn.Module:
    """The generator network (normalised units) described by ``arch``: ``[B, k] -> [B, *field_shape]``."""
    arch = check_arch(arch)
    if arch["kind"] == "conv":
        net = _ConvGeneratorNet(arch)
    else:
        net = _mlp(arch["latent_dim"], arch["field_shape"][0], arch["hidden"], arch["depth"])
    # nn.Tanh and nn.Hardtanh have no parameters, so the state-dict keys are the same either way.
    if arch.get("output", "linear") != "tanh":
        return net
    if "clamp" in arch:
        return nn.Sequential(net, nn.Tanh(), nn.Hardtanh(-arch["clamp"], arch["clamp"]))
    return nn.Sequential(net, nn.Tanh())


def build_critic(arch: dict) -> nn.Module:
    """The critic described by ``arch``: ``[B, *field_shape] -> [B, 1]``."""
    arch = check_arch(arch)
    if arch["kind"] == "conv":
        return _ConvCritic(arch)
    return _mlp(arch["field_shape"][0], 1, arch["hidden"], arch["depth"])


class PriorGenerator(nn.Module):
    """A trained prior ``x = G(z) = mu + s g(z)``: ``[B, latent_dim] -> [B, *field_shape]``, physical units.

    ``g`` is the generator network (trained on normalised fields); ``mu`` and ``s`` (scalar mean and std of
    the training fields) are buffers. Satisfies the DESIGN generator
    contract (``latent_dim``, ``field_shape``).

    Args:
        net: the generator network.
        arch: its architecture dict (gives ``latent_dim`` and ``field_shape``).
        mean: scalar normalisation mean.
        std: scalar normalisation std (> 0).
    """

    def __init__(self, net: nn.Module, arch: dict, mean: Tensor, std: Tensor):
        super().__init__()
        self.net = net
        self.arch = dict(arch)
        self.latent_dim = int(arch["latent_dim"])
        self.field_shape = tuple(int(s) for s in arch["field_shape"])
        self.register_buffer("norm_mean", mean.detach().clone().float().reshape(()))
        self.register_buffer("norm_std", std.detach().clone().float().reshape(()))
        # Residual statistics of held-out fields (`ganflow.prior.residuals`), set by the checkpoint loader.
        self.representation_error: dict | None = None

    def forward(self, z: Tensor) -> Tensor:
        return self.norm_mean + self.norm_std * self.net(z)
