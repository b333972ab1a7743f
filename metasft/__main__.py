"""`python -m metasft ...` is the same program as the `metasft` console script (and what torchrun runs)."""

from metasft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
