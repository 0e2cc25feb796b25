"""Model config files: YAML, read and written without PyYAML where possible.

YAML 1.2 is a superset of JSON, and the configs this project writes (``fam train``,
:meth:`~fam_core.models.store.ModelConfig.to_file`) use that JSON form, so the base install
reads them with the standard library. A config written in YAML's block style needs PyYAML
(installed by the ``serve`` and ``torchserve`` extras).

Example:
    >>> parse_config('{"name": "m", "input_size": [84, 84]}', "config.yaml")
    {'name': 'm', 'input_size': [84, 84]}
    >>> print(dump_config({"name": "m", "task": "embedding"}), end="")
    {
      "name": "m",
      "task": "embedding"
    }
"""

from __future__ import annotations

import json
from typing import Any


def parse_config(text: str, source: object) -> Any:
    """The value of a config's text; ``ValueError`` naming ``source`` if it does not parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        import yaml
    except ImportError:
        raise ValueError(
            f"{source} is YAML beyond its JSON form, which needs PyYAML: pip install pyyaml "
            "(or write the config as JSON, which is valid YAML)"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{source} is not valid YAML: {first}") from None


def dump_config(data: dict[str, Any]) -> str:
    """A config's text in YAML's JSON form (keys in their given order)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
