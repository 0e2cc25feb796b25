"""CLI subcommands: each module named in :data:`fam_core.cli.COMMAND_MODULES` defines
``add_command(commands)``; :mod:`.demo` runs ``fam demo`` and :mod:`.search_output` writes what
``fam search`` prints and saves."""

import argparse
import textwrap


class NamesIntactFormatter(argparse.HelpFormatter):
    """Help wrapped at spaces only: a method name such as ``fam-orthogonal`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)
