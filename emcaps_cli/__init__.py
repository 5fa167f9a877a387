"""emcaps: matrix capsules with EM routing (Hinton, Sabour, Frosst, ICLR 2018).

Importing the package changes no process state (no environment variable, no allocator
setting); the `emcaps` command applies its own in `emcaps_cli.cli.main.main`
(emcaps_cli/utils/allocator.py).
"""

__version__ = "0.1.0"
