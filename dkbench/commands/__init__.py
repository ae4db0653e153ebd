"""Typer command functions, one module per noun; `dkbench/cli.py` registers them on the app."""
