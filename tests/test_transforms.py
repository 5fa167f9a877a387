"""Training augmentation (section 5) and its warm-up, in both standardisation orders."""

import pytest
import torch

from emcaps_cli.data.transforms import eval_batch, train_batch
from emcaps_cli.training.schedule import augment_strength


def images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 2, 48, 48), generator=g, dtype=torch.uint8)


ORDERS = ["crop", "image"]


@pytest.mark.parametrize("order", ORDERS)
def test_zero_strength_is_the_centre_crop(order):
    x = images()
    out = train_batch(x, 2, torch.Generator().manual_seed(1), strength=0.0, order=order)
    torch.testing.assert_close(out, eval_batch(x, 2, order=order), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ORDERS)
def test_full_strength_crops_anywhere_and_jitters(order):
    x = images(64)
    out = train_batch(x, 2, torch.Generator().manual_seed(1), order=order)
    centre = eval_batch(x, 2, order=order)
    changed = (out - centre).abs().amax(dim=(1, 2, 3)) > 0.01  # (64,)
    if order == "image":
        assert changed.all()  # the jitter changes every image
    else:
        assert changed.float().mean() > 0.9  # only the crop: 1 in 289 windows is the centre


def test_crop_order_standardises_what_the_network_reads():
    """ "crop": every training and test crop has zero mean and unit variance; "image": the
    48x48 image has, its crops in general do not."""
    x = images(16)
    for out in (
        train_batch(x, 2, torch.Generator().manual_seed(3), order="crop"),
        eval_batch(x, 2, order="crop"),
        eval_batch(x, 2, offset=(0, 16), order="crop"),
    ):
        torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            out.std(dim=(1, 2, 3), unbiased=False), torch.ones(16), atol=1e-4, rtol=0
        )
    image_order = eval_batch(x, 2, order="image")
    assert (image_order.std(dim=(1, 2, 3), unbiased=False) - 1).abs().max() > 1e-3


def test_crop_order_cancels_brightness_and_contrast():
    """The released code's jitter comes before the crop's standardisation, which removes it:
    a brightness shift and a contrast scaling of the raw image change nothing."""
    x = images(8)
    jittered = x.float() * 0.6 + 40.0  # contrast 0.6 about 0, brightness +40 grey levels
    g = torch.Generator().manual_seed(4)
    torch.testing.assert_close(
        train_batch(jittered, 2, torch.Generator().manual_seed(4), order="crop"),
        train_batch(x, 2, g, order="crop"),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        eval_batch(jittered, 2, order="crop"), eval_batch(x, 2, order="crop"), atol=1e-4, rtol=0
    )


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="standardize='pixel'"):
        eval_batch(images(), 2, order="pixel")


@pytest.mark.parametrize("order", ORDERS)
def test_half_strength_stays_within_half_the_shift(order):
    """At strength 0.5 the 32x32 window starts within ±4 px of the centre (8, 8): a marker
    pixel just outside that reach never shows."""
    x = torch.zeros(200, 2, 48, 48, dtype=torch.uint8)
    x[:, :, 2, 2] = 255  # reachable only by windows starting at row/col <= 2
    x[:, :, 45, 45] = 255  # only by windows starting at >= 14
    x[:, :, 24, 24] = 128  # the centre, always inside

    def peaks(out):  # brightness and contrast are affine per image: standardising undoes them
        z = (out - out.mean(dim=(1, 2, 3), keepdim=True)) / out.std(dim=(1, 2, 3), keepdim=True)
        return z.amax(dim=(1, 2, 3))

    half = peaks(train_batch(x, 2, torch.Generator().manual_seed(2), strength=0.5, order=order))
    full = peaks(train_batch(x, 2, torch.Generator().manual_seed(2), strength=1.0, order=order))
    assert torch.allclose(half, half[0], atol=1e-4)  # only the centre pixel ever shows
    assert not torch.allclose(full, full[0], atol=1e-4)


@pytest.mark.parametrize("size", [24, 32, 48])
def test_batches_are_cropped_to_the_requested_size(size):
    x = images()
    assert train_batch(x, 1, torch.Generator().manual_seed(1), size=size).shape == (
        6,
        1,
        size,
        size,
    )
    assert eval_batch(x, 2, size=size).shape == (6, 2, size, size)


def test_a_crop_larger_than_the_images_is_refused():
    with pytest.raises(ValueError, match="48x48 pixels, smaller than the 56x56 crop"):
        train_batch(images(), 2, torch.Generator().manual_seed(1), size=56)
    with pytest.raises(ValueError, match="smaller than the 56x56 crop"):
        eval_batch(images(), 2, size=56)
    with pytest.raises(ValueError, match="leaves the 48x48 images"):
        eval_batch(images(), 2, size=32, offset=(20, 0))


def test_strength_rises_linearly_over_the_warmup():
    assert augment_strength(0, 100) == 0.0
    assert augment_strength(25, 100) == pytest.approx(0.25)
    assert augment_strength(500, 100) == 1.0
    assert augment_strength(0, 0) == 1.0  # no warm-up: full from the first step
