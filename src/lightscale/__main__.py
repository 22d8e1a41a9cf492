"""``python -m lightscale`` is the same as the ``lightscale`` command."""

from lightscale.cli import main

if __name__ == "__main__":
    main()
