"""Evaluation: feature extractors (local files only), streamed statistics, FID/KID/IS/precision-recall."""
