from __future__ import annotations

import pytest

from joey_core import topics


@pytest.mark.parametrize("name", ["default", "iris-2", "a", "x" * 63])
def test_valid_names(name: str) -> None:
    assert topics.validate_name("pipeline", name) == name


@pytest.mark.parametrize("name", ["", "Iris", "-iris", "iris-", "iris_2", "iris.2", "x" * 64])
def test_invalid_names_are_explained(name: str) -> None:
    with pytest.raises(ValueError, match="invalid pipeline name"):
        topics.validate_name("pipeline", name)


def test_pipeline_topics_are_namespaced_by_workspace() -> None:
    names = topics.pipeline_topics("team-a", "iris")
    assert names.all() == ("joey.team-a.iris.inputs", "joey.team-a.iris.outputs", "joey.team-a.iris.errors")
    assert topics.pipeline_topics("team-b", "iris").inputs != names.inputs
