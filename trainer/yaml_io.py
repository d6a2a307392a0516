"""Reading a settings YAML file: safe, bounded in size, and refusing a key given twice.

One loader for every YAML file a user writes (the trainer's config, the sweep spec): PyYAML's
SafeLoader keeps the last of two equal keys without a word (a duplicated `seed:` axis once ran one
trial instead of two), so this one refuses the second with both line numbers. A file larger than
``SCT_MAX_YAML_BYTES`` (default 1 MB) is refused before it is parsed: parsing a 50 MB grid took
minutes and gigabytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from trainer.errors import ConfigError

MAX_BYTES_ENV = "SCT_MAX_YAML_BYTES"
DEFAULT_MAX_BYTES = 1_000_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (a `<<:` merge may still be overridden)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if first is not None:
                problem = f"duplicate key {key!r} (first on line {first})"
                raise ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def max_bytes() -> int:
    """The largest YAML file read: $SCT_MAX_YAML_BYTES, else 1 MB."""
    raw = os.environ.get(MAX_BYTES_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_MAX_BYTES
    except ValueError:
        raise ConfigError(f"{MAX_BYTES_ENV}: {raw!r} is not a number of bytes") from None


def parse_yaml(text: str) -> Any:
    """`text` parsed by UniqueKeyLoader (yaml.YAMLError on bad syntax or a duplicate key)."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The data of YAML file `path`; ConfigError with one line naming the file (and line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    size, limit = path.stat().st_size, max_bytes()
    if size > limit:
        raise ConfigError(
            f"{path}: {size:,} bytes is larger than the {limit:,} a settings file may have "
            f"(raise {MAX_BYTES_ENV} if it must be this large)"
        )
    try:
        return parse_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", "") or ""
        if problem.startswith("duplicate key") and mark is not None:
            raise ConfigError(f"{path}: line {mark.line + 1}: {problem}; give each key once") from None
        raise ConfigError(f"{path}: invalid YAML{where}; check indentation and quoting") from None
