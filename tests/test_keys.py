from __future__ import annotations

import re

import pytest

from streamcoord.errors import InvalidTaskRef
from streamcoord.keys import KeySpace, TaskRef


@pytest.mark.parametrize(
    ("app", "model", "pk"),
    [
        ("app", "Model", "1"),
        ("app", "Model", "3f2b8c1e-6a4d-4e8f-9b1a-2c3d4e5f6a7b"),
        ("app", "Model", "my-task_slug"),
        ("my_app", "_Private", "x" * 64),
        ("a", "M", "0"),
    ],
)
def test_valid_task_ref(app: str, model: str, pk: str) -> None:
    ref = TaskRef(app, model, pk)
    assert ref.label == f"{app}.{model}:{pk}"
    assert str(ref) == ref.label
    assert ref.model_label == f"{app}.{model}"


@pytest.mark.parametrize(
    ("app", "model", "pk"),
    [
        ("app", "Model", "{1}"),
        ("app", "Model", "a}b"),
        ("app", "Model", "a:b"),
        ("app", "Model", "a b"),
        ("app", "Model", ""),
        ("app", "Model", "x" * 65),
        ("app", "Model", "1\n"),
        ("app", "Model", "1/2"),
        ("app", "Model", "1.2"),
        ("app", "1Model", "1"),
        ("app", "Mo del", "1"),
        ("app", "Model\n", "1"),
        ("app", "", "1"),
        ("app", "a.b", "1"),
        ("", "Model", "1"),
        ("1app", "Model", "1"),
        ("a{p}", "Model", "1"),
        ("a:p", "Model", "1"),
        ("app\n", "Model", "1"),
    ],
)
def test_invalid_task_ref(app: str, model: str, pk: str) -> None:
    with pytest.raises(InvalidTaskRef):
        TaskRef(app, model, pk)


@pytest.mark.parametrize(
    ("pk", "expected"),
    [
        ("17", 17),
        ("0", 0),
        ("abc", "abc"),
        ("17a", "17a"),
        ("-17", "-17"),
        ("12345678901234567890", "12345678901234567890"),
        # Beyond 15 digits JavaScript loses precision, so the id stays a string.
        ("999999999999999", 999_999_999_999_999),
        ("1000000000000000", "1000000000000000"),
    ],
)
def test_pk_json(pk: str, expected: int | str) -> None:
    value = TaskRef("app", "Model", pk).pk_json
    assert value == expected
    assert type(value) is type(expected)


def test_keys_exact() -> None:
    ks = KeySpace()
    ref = TaskRef("app", "Model", "1")
    assert ks.events(ref) == "sc:{app.Model:1}:events"
    assert ks.state(ref) == "sc:{app.Model:1}:state"
    assert ks.models() == "sc:models"
    assert ks.live(ref) == "sc:{app.Model:1}:live"
    assert KeySpace.live_of(ks.events(ref).encode()) == ks.live(ref).encode()


def _hash_tag(key: str) -> str:
    match = re.search(r"\{([^}]*)\}", key)
    assert match is not None
    return match.group(1)


def test_task_keys_share_hash_tag() -> None:
    """Both keys must hash to one cluster slot, or the append script cannot touch both."""
    ks = KeySpace()
    ref = TaskRef("app", "Model", "1")
    assert _hash_tag(ks.events(ref)) == _hash_tag(ks.state(ref)) == "app.Model:1"
    other = TaskRef("app", "Model", "2")
    assert _hash_tag(ks.events(other)) != _hash_tag(ks.events(ref))


def test_custom_prefix() -> None:
    ks = KeySpace("prod")
    ref = TaskRef("app", "Model", "1")
    assert ks.events(ref) == "prod:{app.Model:1}:events"
    assert ks.state(ref) == "prod:{app.Model:1}:state"
    assert ks.models() == "prod:models"
