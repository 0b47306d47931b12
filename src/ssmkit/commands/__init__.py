"""Subcommands of the ``ssmkit`` command line, one module each (see :mod:`ssmkit.cli`)."""
