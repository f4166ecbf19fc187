"""Read a recipe's YAML: no duplicate keys, no alias bombs, nothing too big or too deep to be a recipe; one-line errors.

A module of its own because both `recipe.load_yaml` (the file) and `FreezeArguments` (a `--stages` string) read
recipe YAML, and freezing.py cannot import recipe.py, which imports it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import HFTransferError

# The shipped recipes are under 1 KB and compose to 21-41 YAML nodes (recipes/*.yaml): these bounds are 100x that
# and more, yet a file of `&a [*a...]` aliases nested 9 deep (about 500 bytes) would expand to 10**9 values.
MAX_BYTES = 1 << 20
MAX_VALUES = 10_000  # nodes counted as if every alias were written out
MAX_DEPTH = 32  # PyYAML composes recursively: 600 nested `[` raise RecursionError (400 still load), a traceback

_MERGE_TAG = "tag:yaml.org,2002:merge"


class RecipeYAMLError(HFTransferError, ValueError):
    """A recipe (or `--stages` string) that is not YAML a recipe can be read from; the message says where and what to fix."""


def read_recipe_file(path: Path) -> object:
    """The YAML document in the file at `path` (which exists), read under the bounds above."""
    source = f"Recipe {path}"
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise RecipeYAMLError(f"{source} is {size:,} bytes: a recipe is a few KB of `key: value` lines (at most {MAX_BYTES:,} "
                              "bytes are read). Pass the recipe's YAML file, not a data file.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeYAMLError(f"{source} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}): "
                              "pass a YAML recipe such as recipes/quickstart.yaml, saved as UTF-8.") from None
    return load_recipe_yaml(text, source)


def load_recipe_yaml(text: str, source: str) -> object:
    """YAML `text` as SafeLoader reads it, refused with one line naming `source` if it breaks a rule of this module."""
    if len(text) > MAX_BYTES:
        raise RecipeYAMLError(f"{source} is {len(text):,} characters: a recipe is a few KB (at most {MAX_BYTES:,} are read).")
    loader = None
    try:
        loader = _RecipeLoader(text, source)
        return loader.get_single_data()
    except RecipeYAMLError:
        raise
    except yaml.reader.ReaderError as error:
        raise RecipeYAMLError(f"{source} holds a control character (#x{error.character:04x}) at character {error.position}: "
                              "YAML does not allow them. Remove it.") from None
    except yaml.MarkedYAMLError as error:
        raise RecipeYAMLError(f"{source} is not valid YAML: {_describe(error)}. Fix it there.") from None
    except yaml.YAMLError as error:
        raise RecipeYAMLError(f"{source} is not valid YAML: {' '.join(str(error).split())}.") from None
    except (ValueError, TypeError) as error:  # a scalar that matches a YAML type but is no such value: `2024-02-30`
        raise RecipeYAMLError(f"{source} holds a value YAML cannot read ({error}): quote it, e.g. `hub_revision: '2024-02-30'`.") from None
    finally:
        if loader is not None:
            loader.dispose()


def _describe(error: yaml.MarkedYAMLError) -> str:
    where = error.problem_mark or error.context_mark
    text = f"line {where.line + 1}, column {where.column + 1}: " if where else ""
    text += " ".join(str(error.problem or error.context).split())
    if error.context and error.problem and error.context_mark:
        text += f" ({' '.join(str(error.context).split())} at line {error.context_mark.line + 1})"
    if "'\\t'" in text:
        text += "; YAML indents with spaces, not tabs"
    if "another document" in text:
        text += "; a recipe is one document: remove the `---` line"
    return text


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that, while composing the document, counts the values it expands to and refuses duplicate keys.

    Counting while composing, before anything is constructed: an alias composes to the anchored node itself, so a
    bomb's node graph is small, but every consumer that walks the values (a message's repr, `dataclasses.asdict`,
    json) expands it.
    """

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to; absent while the node is being composed
        self._path: list[object] = []  # the keys and list indices down to the node being composed
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)  # the anchored node itself
            if id(node) not in self._sizes:
                raise RecipeYAMLError(
                    f"{self.source}: alias *{event.anchor} at line {event.start_mark.line + 1} repeats the block that "
                    f"contains it (`&{event.anchor}`, line {node.start_mark.line + 1}), which never ends. Write the values out."
                )
            self._aliases += 1
            return node
        self._path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            if len(self._path) > MAX_DEPTH:
                raise RecipeYAMLError(f"{self.source} nests deeper than {MAX_DEPTH} levels at line "
                                      f"{self.peek_event().start_mark.line + 1}: a recipe needs 5 at most. Flatten it.")
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.MappingNode):
                self._refuse_duplicate_keys(node)
            self._count(node)
        finally:
            self._path.pop()
        return node

    def _count(self, node) -> None:
        children = [child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_VALUES:
            through = " through aliases (*name) that repeat anchored (&name) blocks" if self._aliases else ""
            fix = "Write the values out instead of nesting aliases." if self._aliases else "Keep data out of the recipe."
            raise RecipeYAMLError(f"{self.source} expands to more than {MAX_VALUES:,} values at line {node.start_mark.line + 1} "
                                  f"(`{self._key_path()}`){through}: a recipe holds a few dozen. {fix}")
        self._sizes[id(node)] = size

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        marks: dict[tuple[str, str], list] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:  # `<<: *base` keys may be overridden, as YAML intends
                marks.setdefault((key.tag, key.value), []).append(key.start_mark)
        for (_, name), at in marks.items():
            if len(at) > 1:
                times = "twice" if len(at) == 2 else f"{len(at)} times"
                lines = [mark.line + 1 for mark in at]
                one_line = len(set(lines)) < len(lines)  # `{train: head, train: all}`: say where on the line
                places = [f"{mark.line + 1}:{mark.column + 1}" if one_line else str(mark.line + 1) for mark in at]
                where = ("line:column " if one_line else "lines ") + ", ".join(places[:-1]) + f" and {places[-1]}"
                raise RecipeYAMLError(f"{self.source} sets `{self._key_path(name)}` {times} ({where}); YAML would silently "
                                      "keep only the last. Delete all but one.")

    def _key_path(self, last: str | None = None) -> str:
        path = ""
        for part in [*self._path, last]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif isinstance(part, str):
                path += f".{part}" if path else part
        return path or "the top level"
