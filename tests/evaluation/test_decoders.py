"""The real images a decoder comparison scores: a seeded random subset, not the first files of a sorted folder."""

import json

import torch
from PIL import Image

from unimodal.data.pairs import DataSource
from unimodal.data.shapes import COLORS
from unimodal.evaluation.decoders import real_images


def test_real_images_are_a_seeded_random_subset_of_a_folder_sorted_by_class(tmp_path):
    rows = []
    for i in range(12):  # files sorted by class: six red pictures, then six blue ones
        color = "red" if i < 6 else "blue"
        Image.new("RGB", (16, 16), COLORS[color]).save(tmp_path / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "caption": f"a {color} square"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = DataSource(name=str(tmp_path))

    chosen = real_images(source, "train", 16, 6)
    red = chosen[:, 0].mean(dim=(1, 2)) > 0  # red pictures are bright in the first channel
    assert chosen.shape == (6, 3, 16, 16)
    assert 0 < int(red.sum()) < 6, "the first six files would all be red"
    assert torch.equal(chosen, real_images(source, "train", 16, 6))  # the same seed, the same images
    assert real_images(source, "train", 16, 50).shape[0] == 12  # asking for more gives all of them
