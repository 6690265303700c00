"""Fixtures of the component tests."""

from collections.abc import Iterator

import pytest

from tests.components.hub_standin import HubStandIn


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    """A stand-in for the Hugging Face Hub on 127.0.0.1, empty until the test publishes into it."""
    standin = HubStandIn()
    yield standin
    standin.stop()
