"""`evaluate`: caption fidelity by the judge, the judge's accuracy on real images, and the tokenizer's numbers."""

from unimodal.data.shapes import ShapesConfig
from unimodal.evaluation.evaluate import evaluate_bundle
from unimodal.evaluation.judge import JudgeConfig


def test_evaluate_reports_fidelity_judge_and_tokenizer(bundle, tmp_path):
    shapes = ShapesConfig(train_size=16, test_size=16, heldout_size=16)  # the splits it reads, tiny
    judge = JudgeConfig(train_images=256, epochs=1)
    result = evaluate_bundle(bundle, "heldout", tmp_path / "judge", num_captions=16, shapes=shapes, judge_config=judge)
    for key in ("caption_fidelity", "judge_accuracy_real", "tokenizer_psnr", "tokenizer_codebook_usage"):
        assert key in result
    assert 0 <= result["caption_fidelity"] <= 1 and 0 < result["tokenizer_codebook_usage"] <= 1
    assert result["num_captions"] == 16 and (tmp_path / "judge" / "model.safetensors").is_file()
