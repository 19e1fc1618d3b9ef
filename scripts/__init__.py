"""Developer and demo scripts (python -m scripts.<name>)."""
