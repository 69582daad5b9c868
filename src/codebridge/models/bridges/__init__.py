"""Bridges: tie modalities together (clip, codebook, fdt); each one file behind ``BRIDGES``."""
