"""Subcommands of the ``cbst`` console script, one module each."""
