"""Receptive-field bookkeeping for convolutional capsules (no learned parameters).

Positions are row-major on a (height, width) grid; kernel offsets row-major on K x K.
"""

from __future__ import annotations

import torch

from emcaps_cli.capsules.em import ChildMap


def output_size(size: int, kernel: int, stride: int) -> int:
    """Side of a 'valid' convolution's output grid."""
    return (size - kernel) // stride + 1


def patch_positions(height: int, width: int, kernel: int, stride: int) -> torch.Tensor:
    """Input position (row * width + col) under each (output position, kernel offset): (L, K*K)."""
    out_h, out_w = output_size(height, kernel, stride), output_size(width, kernel, stride)
    rows = torch.arange(out_h)[:, None, None, None] * stride + torch.arange(kernel)[:, None]
    cols = torch.arange(out_w)[None, :, None, None] * stride + torch.arange(kernel)[None, :]
    # rows: (out_h, 1, K, 1), cols: (1, out_w, 1, K) -> (out_h, out_w, K, K)
    return (rows * width + cols).reshape(out_h * out_w, kernel * kernel)


def conv_child_map(height: int, width: int, kernel: int, stride: int, types: int) -> ChildMap:
    """Child ids for exact routing; slot s = offset * types + type, child = position * types + type.

    parent_count is the number of output positions whose receptive field holds the child.
    """
    positions = patch_positions(height, width, kernel, stride)  # (L, K*K)
    child = positions[:, :, None] * types + torch.arange(types)  # (L, K*K, B)
    index = child.reshape(-1)
    counts = torch.bincount(index, minlength=height * width * types).to(torch.float32)
    return ChildMap(index=index, num_children=height * width * types, parent_count=counts[index])


def receptive_field_centres(size: int, layers: list[tuple[int, int]]) -> torch.Tensor:
    """Centres, in input-pixel units, of the receptive fields of a grid after `layers`.

    `layers` lists (kernel, stride) from the input upwards; pixel i spans [i, i+1), so a grid
    cell of a 'valid' conv with kernel k, stride s at index o is centred on input index
    s*o + (k-1)/2 (+0.5 for pixels). Returns (grid side,) float.
    """
    centre = torch.arange(size, dtype=torch.float64) + 0.5  # pixel centres
    for kernel, stride in layers:
        n = output_size(len(centre), kernel, stride)
        start = torch.arange(n) * stride
        centre = (centre[start] + centre[start + kernel - 1]) / 2
    return centre.to(torch.float32)
