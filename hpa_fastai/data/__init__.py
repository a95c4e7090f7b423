"""Data in: the competitions' layouts and label CSVs, image decoding, splits, the one DataBlock
pipeline, the preprocessed cache, near-duplicates and synthetic data."""
