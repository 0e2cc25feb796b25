"""CLI subcommands: each module defines ``add_command(commands)`` (see :mod:`fam_core.cli`)."""

import argparse
import textwrap


class NamesIntactFormatter(argparse.HelpFormatter):
    """Help wrapped at spaces only: a method name such as ``fam-orthogonal`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)
