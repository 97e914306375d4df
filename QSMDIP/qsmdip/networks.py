"""The 3D U-Net that Deep Image Prior uses as its image model.

Layout (the original QSM-DIP network, with its width and depth as arguments), for depth 3 and width w::

    stem:     block(in -> w)                                   skip 0
    encoder:  down(w -> 2w), block;  down(2w -> 4w), block;  down(4w -> 8w), block   (levels 1-3)
    decoder:  x2, up(8w -> 4w), concat skip 2, block(8w -> 4w);  ... ;  x2, up(2w -> w), concat skip 0,
              block(2w -> w)
    head:     1x1x1 conv (w -> out)

``block`` = Conv3d 3x3x3 -> InstanceNorm3d -> LeakyReLU; ``down`` = the same with stride 2;
``up`` = nearest-neighbour x2 upsampling, then a block that halves the channels (``decoder="conv-first"``
swaps the two: the block runs on the coarse grid, 8x fewer voxels, then the upsampling). The network pads its
input to a multiple of ``2 ** depth`` and crops the output back, so any volume size works.

Two CPU costs are avoided without changing the arithmetic (measured on 2 cores, 80 x 96 x 80, forward and
backward): oneDNN runs a 3x3x3 convolution of 1 or 2 input channels on a slow generic path but has a fast
kernel for 3 (image "first layers"), so in fp32 on the CPU the stem's input and weights are padded with zero
channels to 3 (133 -> 51 ms for 2 channels; not under bf16 autocast, where it is not faster); and the 1x1x1
head is a channel contraction (einsum) rather than a convolution (85 -> 21 ms fp32, 52 -> 10 ms bf16).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
import torch.nn.functional as F

NORMS = ("instance", "none")
UPSAMPLE_MODES = ("nearest", "trilinear")
DECODER_ORDERS = ("upsample-first", "conv-first")
PAD_MODES = ("replicate", "constant")
#: input channels oneDNN's fast first-layer 3D convolution kernel takes; fewer are padded with zeros up to it
#: on the CPU in fp32 (module docstring). None turns the padding off.
CPU_STEM_CHANNELS = 3


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return nn.InstanceNorm3d(channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Conv3d (3x3x3, optional stride) -> normalisation -> LeakyReLU.

    The convolution has no bias when a normalisation follows: InstanceNorm removes any constant offset.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "instance",
                 negative_slope: float = 0.2):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=norm == "none"),
            _norm_layer(norm, out_channels),
            nn.LeakyReLU(negative_slope),
        )


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class UNet3d(nn.Module):
    """A plain 3D U-Net with explicit encoder and decoder levels.

    Args:
        in_channels: channels of the input volume (>= 1; default 1: the field, or one noise channel).
        out_channels: channels of the output (>= 1; default 1: susceptibility).
        width: channels of the first level (>= 1; default 16); level ``l`` has ``width * 2**l``.
        depth: number of stride-2 downsamplings (>= 0; default 3, i.e. 16 -> 32 -> 64 -> 128).
            Inputs are padded internally to a multiple of ``2 ** depth``.
        norm: "instance" (InstanceNorm3d without affine parameters, default) or "none" (convolutions
            then get a bias).
        negative_slope: slope of LeakyReLU for negative inputs (>= 0; default 0.2).
        upsample: "nearest" (default, as in the original method) or "trilinear".
        pad_mode: how odd sizes are padded to a multiple of ``2 ** depth``: "replicate" (default) or
            "constant" (zeros).
        decoder: "upsample-first" (default, the original layout: upsample, then the channel-halving block
            at the fine level) or "conv-first" (that block on the coarse level, then upsample: the same
            weights, a fraction of the operations, since the finest level dominates the cost).

    Weights are xavier-normal (gain 1) and biases zero; pass a seeded ``generator`` to
    :meth:`reset_parameters` for a reproducible initialisation independent of the global RNG.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16, depth: int = 3,
                 norm: str = "instance", negative_slope: float = 0.2, upsample: str = "nearest",
                 pad_mode: str = "replicate", decoder: str = "upsample-first"):
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.width = _check_positive_int("width", width)
        self.depth = _check_positive_int("depth", depth, minimum=0)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not (isinstance(negative_slope, (int, float)) and negative_slope >= 0):
            raise ValueError(f"negative_slope must be a number >= 0, got {negative_slope!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if decoder not in DECODER_ORDERS:
            raise ValueError(f"decoder must be one of {DECODER_ORDERS}, got {decoder!r}")
        self.decoder = decoder
        self.upsample = upsample
        self.pad_mode = pad_mode
        channels = [width * 2 ** level for level in range(depth + 1)]
        act = dict(norm=norm, negative_slope=float(negative_slope))

        self.stem = ConvBlock(in_channels, channels[0], **act)
        # Encoder level l: stride-2 conv (channels[l-1] -> channels[l]) then a block.
        self.down = nn.ModuleList(
            nn.Sequential(ConvBlock(channels[l - 1], channels[l], stride=2, **act),
                          ConvBlock(channels[l], channels[l], **act))
            for l in range(1, depth + 1)
        )
        # Decoder level l (deepest first): upsample, conv halving channels, concat skip, block.
        self.up = nn.ModuleList(ConvBlock(channels[l], channels[l - 1], **act) for l in range(depth, 0, -1))
        self.merge = nn.ModuleList(ConvBlock(2 * channels[l - 1], channels[l - 1], **act)
                                   for l in range(depth, 0, -1))
        self.head = nn.Conv3d(channels[0], out_channels, kernel_size=1)
        self.reset_parameters()

    @property
    def size_multiple(self) -> int:
        """Spatial sizes are padded internally to a multiple of this."""
        return 2 ** self.depth

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-normal weights (gain 1) and zero biases, drawn from ``generator`` if given."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.xavier_normal_(module.weight, gain=1.0, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in_channels, i, j, k) -> (batch, out_channels, i, j, k) for any i, j, k >= 1."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (batch, {self.in_channels}, i, j, k), got {tuple(x.shape)}")
        shape = x.shape[-3:]
        m = self.size_multiple
        pads: List[int] = []
        for n in reversed(shape):  # F.pad lists the last axis first
            pads += [0, (-n) % m]
        if any(pads):
            x = F.pad(x, pads, mode=self.pad_mode)
        skips = [self._stem(x)]
        for level in self.down:
            skips.append(level(skips[-1]))
        y = skips.pop()
        for up, merge in zip(self.up, self.merge):
            if self.decoder == "conv-first":
                y = F.interpolate(up(y), scale_factor=2, mode=self.upsample)
            else:
                y = up(F.interpolate(y, scale_factor=2, mode=self.upsample))
            y = merge(torch.cat([y, skips.pop()], dim=1))
        y = self._head(y)
        return y[..., : shape[0], : shape[1], : shape[2]]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The first block; its convolution on zero-padded channels where oneDNN is faster so (module docstring)."""
        conv = self.stem[0]
        extra = 0 if CPU_STEM_CHANNELS is None else CPU_STEM_CHANNELS - x.shape[1]
        if extra <= 0 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.stem(x)
        channel_pad = (0, 0, 0, 0, 0, 0, 0, extra)   # F.pad lists the last axis first; the 4th from last is C
        y = F.conv3d(F.pad(x, channel_pad), F.pad(conv.weight, channel_pad), conv.bias, conv.stride, conv.padding)
        return self.stem[2](self.stem[1](y))

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        """The 1x1x1 output convolution, as a contraction over channels (module docstring)."""
        out = torch.einsum("bcijk,oc->boijk", y, self.head.weight.flatten(1))
        # the bias in the contraction's dtype: under autocast the output stays bf16, as Conv3d's was
        return out if self.head.bias is None else out + self.head.bias.to(out.dtype).view(1, -1, 1, 1, 1)
