"""The shapes judge: what it reads off an image, described in words."""

import torch

from unimodal.evaluation.judge import describe


def test_judge_describes_what_it_reads():
    pred = {k: torch.zeros(2, 4, dtype=torch.long) for k in ("color", "shape", "size")}
    pred["color"][0, 1], pred["shape"][0, 1], pred["size"][0, 1] = 1, 3, 2  # red triangle, large, top right
    assert describe(pred, 0) == "top right: large red triangle" and describe(pred, 1) == "(empty)"
