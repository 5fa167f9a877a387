"""emcaps: matrix capsules with EM routing (Hinton, Sabour, Frosst, ICLR 2018)."""

__version__ = "0.1.0"
