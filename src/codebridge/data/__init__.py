"""Data sources (built-in emoji suites, CSV/TSV, JSONL, WebDataset), preprocessing and batching."""
