"""Training: the epoch loop (loop.py) and what it stands on.

data (splits, the images on the device), schedule (learning rate, margin, augmentation), state
(checkpoint payload, exact resume), rng (seeded streams), distributed (the process group),
signals (Ctrl-C, SIGTERM) and rundir (the run directory and its files).
"""
