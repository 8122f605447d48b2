"""The topic trie against a brute-force MQTT 3.1.1 matcher, and the spec's own examples."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugin.topictrie import TopicTrie, filter_matches, validate_filter

LEVEL = st.sampled_from(["a", "b", "sport", "", "$SYS", "$x", "tennis"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels = [*levels[: draw(st.integers(0, len(levels)))], "#"]
    joined = "/".join(levels)
    return joined or "a"  # the empty filter is invalid


def brute(topic_filter: str, topic: str) -> bool:
    """Independent matcher: the filter as a regular expression, with the '$' rule."""
    import re

    levels = topic_filter.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    parts: list[str] = []
    for level in levels:
        if level == "#":
            pattern = "/".join(parts)
            pattern = f"{pattern}(/.*)?" if parts else ".*"
            return re.fullmatch(pattern, topic, re.S) is not None
        parts.append("[^/]*" if level == "+" else re.escape(level))
    return re.fullmatch("/".join(parts), topic, re.S) is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(filters(), max_size=30), st.lists(TOPIC, min_size=1, max_size=10))
def test_trie_matches_brute_force(topic_filters: list[str], topics: list[str]) -> None:
    trie = TopicTrie()
    for f in topic_filters:
        trie.add(f)
    assert len(trie) == len(set(topic_filters))
    assert sorted(trie) == sorted(set(topic_filters))
    for topic in topics:
        expected = sorted({f for f in topic_filters if brute(f, topic)})
        assert sorted(trie.match(topic)) == expected
        assert all(filter_matches(f, topic) == brute(f, topic) for f in topic_filters)


@settings(max_examples=200, deadline=None)
@given(st.lists(filters(), max_size=20), st.data())
def test_discard_restores_and_prunes(topic_filters: list[str], data: st.DataObject) -> None:
    trie = TopicTrie()
    for f in topic_filters:
        trie.add(f)
    removed = data.draw(st.lists(st.sampled_from(topic_filters), unique=True) if topic_filters else st.just([]))
    for f in removed:
        trie.discard(f)
        trie.discard(f)  # idempotent
    kept = set(topic_filters) - set(removed)
    assert sorted(trie) == sorted(kept)
    assert all((f in trie) == (f in kept) for f in topic_filters)
    for f in kept:
        trie.discard(f)
    assert len(trie) == 0
    assert trie._root.children == {}  # noqa: SLF001 - no dead branches left behind


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [  # MQTT 3.1.1 section 4.7 examples
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "anything/at/all", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("#", "$SYS/monitor/Clients", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ],
)
def test_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    trie = TopicTrie()
    trie.add(topic_filter)
    assert (trie.match(topic) == [topic_filter]) is expected
    assert filter_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "+a", "a\x00b"])
def test_invalid_filters_rejected_and_nothing_changes(bad: str) -> None:
    trie = TopicTrie()
    trie.add("a/b")
    with pytest.raises(ValueError):
        validate_filter(bad)
    with pytest.raises(ValueError):
        trie.add(bad)
    assert list(trie) == ["a/b"]
