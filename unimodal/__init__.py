"""unimodal: unified multimodal token models (DALL-E / Janus style).

Text and images become tokens of one joint vocabulary; one decoder-only transformer models
p(caption, image) and generates images from text, token by token.
"""

__version__ = "0.1.0"
