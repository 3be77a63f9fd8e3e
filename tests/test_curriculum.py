"""toe.curriculum: EfficientTrain's phase table, user tables, lookups at the phase boundaries, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toe.curriculum import Curriculum, Phase

PAPER_TABLE = "0:160:1,60:160:3,120:160:5,180:192:7,240:224:9"


def _table(c: Curriculum):
    return [(p.start_epoch, p.input_size, p.magnitude) for p in c.phases]


def test_efficienttrain_224_patch16_is_the_published_table():
    c = Curriculum.efficienttrain(300, 224, 16)
    assert _table(c) == [(0, 160, 1), (60, 160, 3), (120, 160, 5), (180, 192, 7), (240, 224, 9)]
    assert c.to_table() == PAPER_TABLE
    assert c == Curriculum.parse(PAPER_TABLE, 16)


def test_efficienttrain_64_patch8_rounds_to_the_nearest_multiple():
    # 64 x 5/7 = 45.7 and 64 x 6/7 = 54.9: the nearest multiples of 8 are 48 and 56 (floor would give 40, 48)
    c = Curriculum.efficienttrain(300, 64, 8)
    assert [p.input_size for p in c.phases] == [48, 48, 48, 56, 64]
    # 224 x 5/7 = 160 exactly: with patch 14 the nearest multiple is 154 (11 patches), not 168
    assert [p.input_size for p in Curriculum.efficienttrain(300, 224, 14).phases] == [154, 154, 154, 196, 224]


@pytest.mark.parametrize("epochs", [5, 7, 12, 299, 300, 301])
def test_efficienttrain_phase_starts_split_the_epochs_evenly(epochs):
    c = Curriculum.efficienttrain(epochs, 224, 16)
    # Reference: phase i holds the epochs e with floor(5 e / epochs) == i (the integer split of Schedule).
    expected = [min(e for e in range(epochs) if (5 * e) // epochs == i) for i in range(5)]
    assert list(c.phase_starts()) == expected
    lengths = c.phase_lengths(epochs)
    assert sum(lengths) == epochs and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_efficienttrain_shorter_than_five_epochs_keeps_the_phases_that_run(epochs):
    c = Curriculum.efficienttrain(epochs, 224, 16)
    sizes, magnitudes = [160, 160, 160, 192, 224], [1, 3, 5, 7, 9]
    for e in range(epochs):  # epoch e is in EfficientTrain phase floor(5 e / epochs)
        i = (5 * e) // epochs
        assert (c.input_size(e), c.magnitude(e)) == (sizes[i], magnitudes[i]), (epochs, e)
    assert len(c.phases) == epochs and all(n == 1 for n in c.phase_lengths(epochs))
    assert _table(Curriculum.efficienttrain(1, 32, 4)) == [(0, 24, 1)]  # SMOKE's one epoch at 32 px


def test_lookups_at_the_phase_boundaries():
    c = Curriculum.efficienttrain(300, 224, 16)
    expected = {0: (1, 160, 1), 59: (1, 160, 1), 60: (2, 160, 3), 179: (3, 160, 5), 180: (4, 192, 7),
                239: (4, 192, 7), 240: (5, 224, 9), 299: (5, 224, 9), 1000: (5, 224, 9)}
    for epoch, (phase, size, m) in expected.items():
        assert (c.phase(epoch), c.input_size(epoch), c.magnitude(epoch)) == (phase, size, m), epoch
    assert c.rand_augment(0) == "rand-m1-mstd0.5-inc1" and c.rand_augment(250) == "rand-m9-mstd0.5-inc1"
    assert c.phase_lengths(300) == [60, 60, 60, 60, 60]
    assert c.phase_lengths(200) == [60, 60, 60, 20, 0]


def test_parse_user_table_and_whitespace():
    c = Curriculum.parse(" 0:32:2 , 3:48:4,10:64:9", 16)
    assert _table(c) == [(0, 32, 2), (3, 48, 4), (10, 64, 9)]
    assert (c.phase(2), c.phase(3), c.phase(9), c.phase(10)) == (1, 2, 2, 3)
    assert c.patch_size == 16 and c.phase_starts() == [0, 3, 10]
    assert Curriculum.parse("0:224:9").phases == (Phase(0, 224, 9),)


@pytest.mark.parametrize("table, needle", [
    ("", "table"),
    ("0:160", "'0:160' is not start:size:magnitude"),
    ("0:160:1:2", "is not start:size:magnitude"),
    ("0:160:x", "is not start:size:magnitude"),
    ("0:160:1,", "'' is not start:size:magnitude"),
    ("5:160:1", "start at epoch 0"),
    ("0:160:1,60:192:3,60:224:5", "strictly increasing"),
    ("0:160:1,60:150:3", "150 is not a positive multiple of patch_size 16"),
    ("0:0:1", "0 is not a positive multiple"),
    ("0:160:-1", "magnitude must be >= 0"),
])
def test_parse_errors_name_the_table(table, needle):
    with pytest.raises(ValueError) as err:
        Curriculum.parse(table, 16)
    assert needle in str(err.value) and "table" in str(err.value)


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochs": 0, "final_size": 224, "patch_size": 16}, "epochs"),
    ({"epochs": 300.0, "final_size": 224, "patch_size": 16}, "epochs"),
    ({"epochs": 300, "final_size": 200, "patch_size": 16}, "final_size"),
    ({"epochs": 300, "final_size": 0, "patch_size": 16}, "final_size"),
    ({"epochs": 300, "final_size": 224, "patch_size": 0}, "patch_size"),
])
def test_efficienttrain_errors_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Curriculum.efficienttrain(**kwargs)


def test_value_object_validation_and_lookup_errors():
    with pytest.raises(ValueError, match="phases"):
        Curriculum(())
    with pytest.raises(ValueError, match="phases"):
        Curriculum(((0, 160, 1),))  # tuples are not Phase
    with pytest.raises(ValueError, match="patch_size"):
        Curriculum((Phase(0, 160, 1),), patch_size=0)
    with pytest.raises(ValueError, match="patch_size"):
        Curriculum.parse("0:160:1", 0)
    c = Curriculum((Phase(0, 160, 1),), 16)
    with pytest.raises(ValueError, match="epoch"):
        c.phase(-1)
    with pytest.raises(ValueError, match="epochs"):
        c.phase_lengths(0)
    with pytest.raises(AttributeError):
        c.patch_size = 8  # frozen


def test_importing_the_curriculum_needs_no_torch():
    code = "import sys, toe.curriculum; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------ frequency_crop
def _crop_by_definition(images, size):
    """EfficientTrain's definition step by step: fft2, copy the four corner blocks of size // 2 into an empty
    size x size spectrum, scale by (size / H)^2, ifft2, real part."""
    import torch

    half, side = size // 2, images.shape[-1]
    spectrum = torch.fft.fft2(images)
    low = torch.zeros(*images.shape[:2], size, size, dtype=spectrum.dtype)
    low[..., :half, :half] = spectrum[..., :half, :half]
    low[..., :half, size - half:] = spectrum[..., :half, side - half:]
    low[..., size - half:, :half] = spectrum[..., side - half:, :half]
    low[..., size - half:, size - half:] = spectrum[..., side - half:, side - half:]
    return torch.fft.ifft2(low * (size / side) ** 2).real


def _crop_by_fftshift(images, size):
    """Independent route: centre the spectrum (zero frequency at index H // 2), cut the central size x size
    window (frequencies -size/2 .. size/2 - 1), un-centre it and invert; numpy in float64."""
    import numpy as np

    x = images.double().numpy()
    side = x.shape[-1]
    centred = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    lo = side // 2 - size // 2
    window = centred[..., lo:lo + size, lo:lo + size]
    out = np.fft.ifft2(np.fft.ifftshift(window, axes=(-2, -1))).real * (size / side) ** 2
    return out


@pytest.mark.parametrize("side,size", [(64, 48), (64, 56), (224, 160), (224, 192), (9, 4), (32, 32), (8, 2)])
def test_frequency_crop_matches_the_definition_and_the_fftshift_route(side, size):
    import numpy as np
    import torch

    from toe.curriculum import frequency_crop

    g = torch.Generator().manual_seed(side * 1000 + size)
    images = torch.rand(2, 3, side, side, generator=g)
    out = frequency_crop(images, size)
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, _crop_by_definition(images, size), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), _crop_by_fftshift(images, size), rtol=1e-5, atol=1e-5)


def test_frequency_crop_keeps_constants_and_low_frequencies():
    import math

    import torch

    from toe.curriculum import frequency_crop

    constant = torch.full((1, 3, 64, 64), 0.37)
    torch.testing.assert_close(frequency_crop(constant, 48), torch.full((1, 3, 48, 48), 0.37), rtol=0, atol=1e-6)
    # a cosine of 3 cycles per image is below the cut-off: sampled at 48 px it is the same cosine
    grid = torch.arange(64) / 64
    wave = torch.cos(2 * math.pi * 3 * grid)[None, None, :, None].expand(1, 1, 64, 64)
    expected = torch.cos(2 * math.pi * 3 * torch.arange(48) / 48)[None, None, :, None].expand(1, 1, 48, 48)
    torch.testing.assert_close(frequency_crop(wave, 48), expected, rtol=0, atol=1e-5)
    # half precision comes back as fp32, equal to the fp32 crop of the same values
    half = torch.rand(1, 3, 32, 32).half()
    torch.testing.assert_close(frequency_crop(half, 16), frequency_crop(half.float(), 16))


@pytest.mark.parametrize("size,match", [(47, "size must be an even integer in \\[2, 64\\]"), (0, "size"),
                                        (66, "size"), (48.0, "size"), (True, "size")])
def test_frequency_crop_refuses_bad_sizes(size, match):
    import torch

    from toe.curriculum import frequency_crop

    with pytest.raises(ValueError, match=match):
        frequency_crop(torch.zeros(1, 3, 64, 64), size)


def test_frequency_crop_refuses_non_square_images():
    import torch

    from toe.curriculum import frequency_crop

    with pytest.raises(ValueError, match=r"images must be a \[B, C, H, H\] tensor \(square\), got \(1, 3, 64, 48\)"):
        frequency_crop(torch.zeros(1, 3, 64, 48), 32)
    with pytest.raises(ValueError, match="images"):
        frequency_crop(torch.zeros(3, 64, 64), 32)


def test_downsample_mode_of_the_curriculum():
    c = Curriculum.efficienttrain(300, 224, 16)
    assert c.downsample == "fourier"
    import dataclasses

    assert dataclasses.replace(c, downsample="resize").downsample == "resize"
    with pytest.raises(ValueError, match="downsample must be one of fourier, resize"):
        dataclasses.replace(c, downsample="bilinear")
    # an odd phase size cannot be a Fourier crop (the training entry refuses it); the table itself is valid
    assert Curriculum((Phase(0, 21, 1), Phase(2, 28, 9)), 7).odd_sizes() == [21]
    assert Curriculum.efficienttrain(300, 224, 16).odd_sizes() == []
