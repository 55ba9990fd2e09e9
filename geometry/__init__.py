"""Geometry: cameras, SfM, Gaussian splatting, depth, view relations, alignment baselines."""
