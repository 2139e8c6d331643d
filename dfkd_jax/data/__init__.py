"""Data: labelled evaluation sources and tfds builders for local CIFAR files."""
