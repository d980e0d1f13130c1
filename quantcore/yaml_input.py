"""YAML read from users' files (recipes, sweep files): ``yaml.safe_load`` with duplicate keys refused.

``yaml.safe_load`` keeps the last of two equal keys in one mapping, so ``limit: -1`` followed by
``limit: 37`` silently became 37; YAML itself says keys are unique. Callers turn
:class:`DuplicateKeyError` into their own error type (RecipeError, SweepError).
"""
from __future__ import annotations

from typing import Any, Dict

import yaml

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A key appears twice in one mapping; the message names the source, the key and its lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: Dict[Any, int] = {}
            # the node's own keys only: a key given beside a `<<:` merge overrides the merged one, as YAML means
            merges = 0
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # one merge key per mapping: `<<: [*a, *b]` merges several
                    merges += 1
                    if merges > 1:
                        raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: merge key '<<' appears "
                                                f"twice in one mapping; merge several with <<: [*a, *b]")
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise DuplicateKeyError(f"line {line}: key {key!r} appears twice in one mapping "
                                                f"(first on line {first[key]})")
                    first[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``; a repeated key raises :class:`DuplicateKeyError`
    (``SOURCE line N: key 'k' appears twice in one mapping (first on line M)``)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise DuplicateKeyError(f"{source} {err}") from None
