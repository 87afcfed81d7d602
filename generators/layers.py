"""Layers the generators share."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Which rows (columns) of a 3x3 kernel reach each tap of the equivalent 4x4 transposed kernel: after
# a nearest x2 upsampling, an even output row sees input rows i - 1 (kernel row 0) and i (rows 1 and
# 2), an odd one rows i (rows 0 and 1) and i + 1 (row 2); with stride 2 and padding 1 those are taps
# 3, 1 (even) and 2, 0 (odd).
_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class UpsampleConv2d(nn.Conv2d):
    """Nearest x2 upsampling followed by this 3x3 convolution (stride 1, padding 1), as one
    transposed convolution (stride 2, padding 1) of the input with a 4x4 kernel whose taps are sums
    of the 3x3 kernel's: 16 multiply-adds per input pixel and channel pair instead of 36 on the 4x
    larger upsampled map, which is never made. The function is Upsample + Conv2d's up to float
    rounding; the parameters are the 3x3 kernel and bias, so initialization, checkpoints and
    optimizer states are theirs."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)
        # moves with the module, and is not saved: checkpoints hold only the 3x3 kernel and bias
        self.register_buffer("fold", torch.tensor(_FOLD), persistent=False)

    def transposed_weight(self) -> torch.Tensor:
        """(in, out, 4, 4): the kernel of the equivalent transposed convolution."""
        fold = self.fold.to(self.weight.dtype)
        return torch.einsum("ay,oiyx,bx->ioab", fold, self.weight, fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.transposed_weight()
        if self.weight.is_contiguous(memory_format=torch.channels_last) and not self.weight.is_contiguous():
            # a module in channels_last runs its transposed convolution so too (oneDNN's fast path on CPU)
            weight, x = (t.contiguous(memory_format=torch.channels_last) for t in (weight, x))
        return F.conv_transpose2d(x, weight, self.bias, stride=2, padding=1)
