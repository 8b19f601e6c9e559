import pytest

from tests.kube.shop import make_shop


@pytest.fixture(scope="module")
def shop(cluster, namespace):
    """A namespace shaped like a small application, with an Ingress to the traffic-proxy."""
    yield from make_shop(cluster, namespace)
