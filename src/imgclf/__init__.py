"""imgclf: a folder of labelled images in, a tracked leaderboard of image classifiers out."""

__version__ = "0.1.0"
