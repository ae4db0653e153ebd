"""Entry point: `python cli.py ...` is the same as the `dkbench` console script."""

from dkbench.launch import main

if __name__ == "__main__":
    main()
