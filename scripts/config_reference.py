"""Write the docs' config reference, ``docs/config.md``, from the config schema.

    python scripts/config_reference.py          # rewrite docs/config.md
    python scripts/config_reference.py --check  # exit 1 if docs/config.md is stale

The table is :data:`fam_core.models.config_schema.KEYS`; ``tests/models/test_config_schema.py``
fails when the committed page differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fam_core.models.config_schema import reference_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main(argv: list[str]) -> int:
    text = reference_markdown()
    if "--check" in argv:
        if PAGE.read_text() != text:
            print(f"{PAGE} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
