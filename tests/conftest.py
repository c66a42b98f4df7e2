import pytest


@pytest.fixture
def anyio_backend():  # some plugins ask; netra runs on trio only
    return "trio"
