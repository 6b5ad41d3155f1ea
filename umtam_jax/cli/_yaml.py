"""The YAML reader of ``umtam-merge``: PyYAML's safe loader, hardened.

Configuration files and ``--param``/``--expert`` values are read with a ``SafeLoader``
subclass (no tag ever builds an object) that also refuses anchors and aliases (no "billion
laughs" expansion), merge keys (``<<``), duplicate keys and nesting deeper than
:data:`MAX_CONFIG_DEPTH`; errors name the file or flag and the line. Numbers in exponent
notation without a decimal point (``5e-1``, ``1e3``) are floats, as in YAML 1.2 and as
mergekit reads them, not the strings of PyYAML's YAML 1.1.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration (reported with exit status 2)."""


def is_number(x: Any) -> bool:
    """Whether a configuration value is a number (an int or float; a bool is not)."""
    return isinstance(x, int | float) and not isinstance(x, bool)


MAX_CONFIG_BYTES = 2**20
"""Largest configuration file read (1 MiB)."""

MAX_CONFIG_DEPTH = 64
"""Deepest nesting of YAML collections accepted (PyYAML's composer recurses)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing anchors/aliases, merge keys, duplicate keys and deep nesting."""

    _depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self._depth >= MAX_CONFIG_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise yaml.YAMLError(f"YAML nested deeper than {MAX_CONFIG_DEPTH} levels, line {line}")
        self._depth += 1
        try:
            return self._compose_node(parent, index)
        finally:
            self._depth -= 1

    def _compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"YAML aliases (*{event.anchor}) are not allowed, line {event.start_mark.line + 1}"
            )
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise yaml.YAMLError(
                f"YAML anchors (&{anchor}) are not allowed, line {event.start_mark.line + 1}"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.YAMLError(
                    f"YAML merge keys (<<) are not allowed, line {key_node.start_mark.line + 1}"
                )
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                duplicate = False
            if duplicate:
                raise yaml.YAMLError(f"duplicate key {key!r}, line {key_node.start_mark.line + 1}")
            with contextlib.suppress(TypeError):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's exponent floats that YAML 1.1 leaves as strings: 5e-1, -2E3, 1_000e-3.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, name: str) -> Any:
    """``text`` parsed with :class:`_Loader`; ``name`` (a file or flag) appears in errors."""
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
