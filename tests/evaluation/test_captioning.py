"""Reading a shapes caption back into its attributes."""

from unimodal.evaluation.captioning import parse_caption


def test_parse_caption_reads_every_attribute_in_order():
    parsed = parse_caption("a large red circle at the top left and blue square, bottom right, small")
    assert parsed == {"colors": ["red", "blue"], "shapes": ["circle", "square"], "sizes": ["large", "small"],
                      "positions": ["top left", "bottom right"]}  # fmt: skip
    assert parse_caption("a red thing") == {"colors": [], "shapes": [], "sizes": [], "positions": []}
