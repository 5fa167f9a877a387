"""`python -m emcaps_cli` (and `torchrun -m emcaps_cli`) runs the command line."""

from emcaps_cli.cli import main

if __name__ == "__main__":
    main()
