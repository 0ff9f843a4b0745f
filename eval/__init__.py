"""Evaluation: sample grids now; FID / IS and the results table build on these."""
