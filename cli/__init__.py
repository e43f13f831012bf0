"""The typer command line (installed as ``securegmi.cli``): the composition root."""
