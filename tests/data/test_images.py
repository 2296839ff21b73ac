"""Image files to tensors: any mode and size converts, a broken file is named."""

import pytest
import torch
from PIL import Image

from unimodal.data.images import BadImageError, image_to_tensor, open_image


def test_image_to_tensor_converts_any_mode_and_size():
    for mode in ("L", "RGBA", "P", "I;16", "LA"):
        img = Image.new(mode, (50, 20))
        x = image_to_tensor(img, 32)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    tiny = image_to_tensor(Image.new("RGB", (8, 8), (255, 0, 0)), 32)  # upscaled, not rejected
    assert tiny.shape == (3, 32, 32) and torch.allclose(tiny[0], torch.ones(32, 32))


def test_open_image_names_the_bad_file(tmp_path):
    bad = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(bad)
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(BadImageError, match="truncated.png"):
        open_image(str(bad))
