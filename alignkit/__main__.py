"""`python -m alignkit` is the `alignkit` command."""

from alignkit.cli import main

if __name__ == "__main__":
    main()
