"""What --eps bounds: the drop of a model's quality against the original's, its upper confidence
bound (confidence.py), and the user's own metric (user.py)."""
