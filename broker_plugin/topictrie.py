"""A topic-filter index: which subscription filters match a published topic name.

The broker keeps one entry per distinct filter; matching a topic walks the trie
level by level, so its cost grows with the topic's depth and the number of
matching filters, not with the number of subscriptions (stock amqtt scans every
filter on every publish). MQTT 3.1.1 rules (section 4.7): ``+`` matches exactly
one level, ``#`` (last level only) matches the parent level and any number of
levels below it, and a topic whose name starts with ``$`` is not matched by a
filter whose first level is a wildcard.

This module knows topic strings only: no sessions, no asyncio, no amqtt.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["TopicTrie", "filter_matches", "validate_filter"]


def validate_filter(topic_filter: str) -> None:
    """Raise ``ValueError`` unless ``topic_filter`` is a valid MQTT 3.1.1 topic filter."""
    if not topic_filter:
        raise ValueError("a topic filter must not be empty")
    if "\x00" in topic_filter:
        raise ValueError("a topic filter must not contain NUL")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"'#' must be a whole level and the last one: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic_filter`` matches the topic name ``topic`` (one pair, no index)."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


class _Node:
    __slots__ = ("children", "filter")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filter: str | None = None


class TopicTrie:
    """A set of topic filters indexed for matching topic names.

    ``add`` and ``discard`` are idempotent; ``match`` yields each matching
    filter once. Filters are validated on ``add`` (``ValueError``, the trie is
    unchanged).
    """

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, topic_filter: object) -> bool:
        if not isinstance(topic_filter, str):
            return False
        node: _Node | None = self._root
        for level in topic_filter.split("/"):
            node = node.children.get(level) if node is not None else None
            if node is None:
                return False
        return node is not None and node.filter is not None

    def __iter__(self) -> Iterator[str]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.filter is not None:
                yield node.filter
            stack.extend(node.children.values())

    def add(self, topic_filter: str) -> None:
        """Index ``topic_filter`` (no-op if already present)."""
        validate_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.filter is None:
            node.filter = topic_filter
            self._size += 1

    def discard(self, topic_filter: str) -> None:
        """Remove ``topic_filter`` if present, pruning empty branches."""
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.filter is None:
            return
        node.filter = None
        self._size -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.filter is not None or child.children:
                break
            del parent.children[level]

    def match(self, topic: str) -> list[str]:
        """Every indexed filter matching the topic name ``topic``."""
        levels = topic.split("/")
        found: list[str] = []
        dollar = topic.startswith("$")
        # (node, depth) frontier; depth = number of topic levels consumed.
        frontier: list[tuple[_Node, int]] = [(self._root, 0)]
        last = len(levels)
        while frontier:
            node, depth = frontier.pop()
            hash_child = node.children.get("#")
            if hash_child is not None and not (dollar and depth == 0):
                # '#' also matches the parent level, hence before the end check.
                found.append(hash_child.filter)  # type: ignore[arg-type]
            if depth == last:
                if node.filter is not None:
                    found.append(node.filter)
                continue
            level = levels[depth]
            exact = node.children.get(level)
            if exact is not None:
                frontier.append((exact, depth + 1))
            plus = node.children.get("+")
            if plus is not None and not (dollar and depth == 0):
                frontier.append((plus, depth + 1))
        return found
