"""The science: simulated data with a known truth, connectivity analysis, and figures.

Nothing here talks to the cloud: it reads and writes local files only.
"""
