"""Image folders, decoding and the SimCLR augmentation pipeline."""
