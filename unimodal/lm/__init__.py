"""The joint sequence model: the joint vocabulary (`vocab`, the only id arithmetic), the segment grammar
(`grammar`, the only logic of which id may follow which) and the transformer with its loss (`transformer`)."""
