"""Measuring a trained system: the shapes judge (`judge`), caption fidelity (`evaluate`), captioning accuracy
(`captioning`), tokenizer reconstructions (`reconstruct`), and run comparison from CSV logs (`compare`)."""
