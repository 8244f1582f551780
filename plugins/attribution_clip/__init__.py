"""CLIP image-embedding similarity (open_clip) and the weight-free ``pixel-similarity`` baseline."""
