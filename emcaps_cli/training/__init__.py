"""Training: the epoch loop (loop.py) and run directories (rundir.py)."""
