"""``python -m fam_core``: the ``fam`` command line (:mod:`fam_core.cli`)."""

from fam_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
