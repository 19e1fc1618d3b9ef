"""Building, slimming and checking the submission image (see docs/container.md)."""
