"""CLI subcommands: each module defines ``add_command(commands)`` (see :mod:`fam_core.cli`)."""
