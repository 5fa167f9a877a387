"""Capsule building blocks: EM routing, capsule layers, and the network of Fig. 1."""
