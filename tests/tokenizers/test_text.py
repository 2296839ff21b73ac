"""The BPE text tokenizer: byte-level round trips, merges learned, loadable by plain transformers."""

from transformers import PreTrainedTokenizerFast

from unimodal.tokenizers.text import TextTokenizer

TEXTS = ["a small red circle at the top left", "blue square, bottom right, large"] * 20


def test_bpe_round_trip_and_transformers_loading(tmp_path):
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TEXTS[:2] + ["emoji 🐱 and 日本語, unseen words!"]:
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text  # byte-level: any text survives
        assert hf(text)["input_ids"] == ids
    assert TextTokenizer.load(tmp_path).encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].split()) * 2  # merges learned: words are few tokens
