"""Tokenizers: byte-level BPE for captions (`text`), the VQ image autoencoder (`image`) with its
quantizers (`quantizers`) and adversarial losses (`losses`)."""
