"""Compensation: each factored layer's last step refit to the original's outputs (refit.py)."""
