"""Image preparation shared by training, evaluation and attacks (section 5).

Two orders, by ModelConfig.standardize:

* "image" (section 5's text): per-image standardisation of the 48x48 image (zero mean, unit
  variance over all its channels and pixels), then a crop of the network's input size
  (ModelConfig.input_size, 32x32): random for training, centre for test; then, for training
  only, random brightness and contrast.
* "crop" (the authors' released code): the crop first, then the crop is standardised. The
  released code draws brightness and contrast before that standardisation, which removes
  them again (a shift of every pixel and a scaling about the mean cancel exactly), so none
  is drawn here: training augmentation is the random crop alone.

All functions work on batches on any device; randomness comes from an explicit
`torch.Generator` on the batch's device.

Units: after standardisation, one unit is one standard deviation of the pixels of the image
("image") or of the crop ("crop"); the attack ε is measured in these units.
"""

from __future__ import annotations

import torch

from emcaps_cli.defaults import DEFAULT_STANDARDIZE, STANDARDIZES

CROP_SIZE = 32  # side of the crop every network reads (ModelConfig.input_size)
# Training-time photometric jitter, in standardised units.
BRIGHTNESS_DELTA = 0.25  # add U(-0.25, 0.25) to every pixel of an image
CONTRAST_RANGE = (0.7, 1.3)  # scale deviations from the image mean by U(0.7, 1.3)
STD_FLOOR = 1e-3  # a constant image (std 0) is centred, not blown up


def select_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, 2, H, W) stereo pairs -> (N, channels, H, W); channels=1 keeps the left view."""
    return images if channels == 2 else images[:, :1]


def standardize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float (N, C, H, W) -> float32 with zero mean and unit variance per image."""
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False).clamp(min=STD_FLOOR)
    return (x - mean) / std


def require_crop(images: torch.Tensor, size: int, top: int = 0, left: int = 0) -> None:
    """Raise ValueError unless the size x size window at (top, left) lies inside the images."""
    h, w = images.shape[-2:]
    if size > min(h, w):
        raise ValueError(
            f"images are {h}x{w} pixels, smaller than the {size}x{size} crop the network reads "
            "(ModelConfig.input_size)"
        )
    if not (0 <= top <= h - size and 0 <= left <= w - size):
        raise ValueError(f"a {size}x{size} crop at ({top}, {left}) leaves the {h}x{w} images")


def crop(images: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """The same (top, left) window of every image: (N, C, H, W) -> (N, C, size, size)."""
    require_crop(images, size, top, left)
    return images[:, :, top : top + size, left : left + size]


def center_crop(images: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    h, w = images.shape[-2:]
    return crop(images, (h - size) // 2, (w - size) // 2, size)


def multicrop_offsets(image_size: int = 48, size: int = CROP_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the test-time crops: the centre plus the four diagonal offsets
    (half-way between the centre and each corner), as in the authors' released code."""
    c = (image_size - size) // 2
    d = c // 2
    return [(c, c), (c - d, c - d), (c - d, c + d), (c + d, c - d), (c + d, c + d)]


def _offset_range(side: int, size: int, reach: float) -> tuple[int, int]:
    """[low, high] of a crop's start along one axis: anywhere for reach >= 1, else the centre
    start ± reach × the centre start."""
    if reach >= 1:
        return 0, side - size
    centre = (side - size) // 2
    shift = round(max(reach, 0.0) * centre)
    return centre - shift, centre + shift


def random_crop(
    images: torch.Tensor, size: int, generator: torch.Generator, reach: float = 1.0
) -> torch.Tensor:
    """An independent random size x size window per image, gathered without a Python loop.

    reach in [0, 1] scales how far the window may move from the centre (1: anywhere)."""
    require_crop(images, size)
    n, c, h, w = images.shape
    dev = images.device
    top_lo, top_hi = _offset_range(h, size, reach)
    left_lo, left_hi = _offset_range(w, size, reach)
    top = torch.randint(top_lo, top_hi + 1, (n,), generator=generator, device=dev)
    left = torch.randint(left_lo, left_hi + 1, (n,), generator=generator, device=dev)
    ar = torch.arange(size, device=dev)
    rows = (top[:, None] + ar)[:, None, :, None].expand(n, c, size, size)  # (N, C, s, s)
    cols = (left[:, None] + ar)[:, None, None, :].expand(n, c, size, size)  # (N, C, s, s)
    flat = images.reshape(n, c, h * w)
    return flat.gather(2, (rows * w + cols).reshape(n, c, -1)).reshape(n, c, size, size)


def random_brightness_contrast(
    images: torch.Tensor, generator: torch.Generator, strength: float = 1.0
) -> torch.Tensor:
    """Per-image random contrast (about the image mean) and brightness shift; strength in
    [0, 1] scales both ranges about "no change"."""
    n = images.shape[0]
    dev = images.device
    u = torch.rand((n, 2), generator=generator, device=dev, dtype=images.dtype)  # (N, 2)
    lo, hi = CONTRAST_RANGE
    contrast = lo + (hi - lo) * u[:, 0]
    if strength != 1.0:  # at full strength the draw stays bit-identical to earlier runs
        contrast = 1 + strength * (contrast - 1)
    contrast = contrast.view(n, 1, 1, 1)
    brightness = (strength * BRIGHTNESS_DELTA * (2 * u[:, 1] - 1)).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * contrast + mean + brightness


def require_order(order: str) -> None:
    """Raise ValueError unless `order` is a ModelConfig.standardize value."""
    if order not in STANDARDIZES:
        raise ValueError(f"standardize={order!r}: expected one of {', '.join(STANDARDIZES)}")


def train_batch(
    images: torch.Tensor,
    channels: int,
    generator: torch.Generator,
    size: int = CROP_SIZE,
    strength: float = 1.0,
    order: str = DEFAULT_STANDARDIZE,
) -> torch.Tensor:
    """uint8 (N, 2, H, W) -> augmented float (N, channels, size, size); size is the network's
    ModelConfig.input_size, at most H and W (ValueError otherwise); order is its
    ModelConfig.standardize.

    strength in [0, 1] scales the augmentation: 0 is the centre crop, 1 the full ranges."""
    require_order(order)
    x = select_channels(images, channels)
    if order == "crop":
        return standardize(random_crop(x.float(), size, generator, reach=strength))
    cropped = random_crop(standardize(x), size, generator, reach=strength)
    return random_brightness_contrast(cropped, generator, strength)


def eval_batch(
    images: torch.Tensor,
    channels: int,
    size: int = CROP_SIZE,
    offset: tuple[int, int] | None = None,
    order: str = DEFAULT_STANDARDIZE,
) -> torch.Tensor:
    """uint8 (N, 2, H, W) -> standardised crop (N, channels, size, size); centre by default.
    size is the network's ModelConfig.input_size, at most H and W (ValueError otherwise);
    order is its ModelConfig.standardize."""
    require_order(order)
    x = select_channels(images, channels)
    if order == "image":
        x = standardize(x)
    out = center_crop(x, size) if offset is None else crop(x, offset[0], offset[1], size)
    return standardize(out) if order == "crop" else out
