"""Encoders (one file per modality), bridges (one file per method) and the assembled model."""
