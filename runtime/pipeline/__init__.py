"""The per-frame stages: decode, preprocess, postprocess, encode."""
