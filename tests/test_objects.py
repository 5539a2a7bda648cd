"""Object mentions: plurals, synonyms, bare shapes, and presence against gold lists."""

import pytest

from alignkit.objects import Mention, find_mentions, is_present, parse_object


def test_plural_synonym_and_case_are_canonicalised():
    found = find_mentions("Two Blue discs, a violet box and some triangles.")
    assert found == [Mention("circle", "blue"), Mention("square", "purple"), Mention("triangle", None)]


def test_words_inside_other_words_are_not_mentions():
    assert find_mentions("squared circular redness") == []


def test_presence():
    gold = ["red square", "blue circle"]
    assert is_present(Mention("square", "red"), gold)
    assert not is_present(Mention("square", "blue"), gold)
    assert is_present(Mention("circle"), gold)
    assert not is_present(Mention("triangle"), gold)


def test_parse_object_rejects_non_objects():
    assert parse_object("green triangles") == Mention("triangle", "green")
    with pytest.raises(ValueError):
        parse_object("a cat")
