"""Modality encoders: each maps a batch of preprocessed inputs to ``Features``."""
