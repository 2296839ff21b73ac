"""Generation with a trained system: the plain sampling path on `generate()` (`sampling`), the bundle
(`bundle`), captioning (`caption`), reranking (`rerank`); `fast/` holds the opt-in, hardware-tuned path."""
