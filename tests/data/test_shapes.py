"""The built-in shapes dataset: deterministic, captions that name every object, held-out colour-shape pairs."""

from unimodal.data.shapes import COLORS, HELDOUT_PAIRS, SHAPES, ShapesConfig, scene_from_row, shapes_dataset

SMALL = ShapesConfig(train_size=400, test_size=50, heldout_size=50)


def test_shapes_is_deterministic_and_holds_out_pairs(hf_cache):
    dd = shapes_dataset(SMALL, cache_dir=str(hf_cache))
    again = shapes_dataset(SMALL, cache_dir=str(hf_cache / "other"))
    assert dd["train"]["text"] == again["train"]["text"]
    assert set(dd) == {"train", "test", "heldout"}
    held = set(HELDOUT_PAIRS)
    train_pairs = {(o["color"], o["shape"]) for row in dd["train"] for o in scene_from_row(row)}
    assert not train_pairs & held, "a held-out colour-shape pair leaked into train"
    assert {c for c, _ in train_pairs} == set(COLORS) and {s for _, s in train_pairs} == set(SHAPES)
    for row in dd["heldout"]:
        assert any((o["color"], o["shape"]) in held for o in scene_from_row(row))
    row = dd["train"][0]
    for o in scene_from_row(row):  # the caption names every object's attributes
        assert o["color"] in row["text"] and o["shape"] in row["text"] and o["position"] in row["text"]
