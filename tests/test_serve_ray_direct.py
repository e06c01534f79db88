"""Ray Serve with direct ingress (`service-ray run --direct-ingress`), on its own local cluster:
the ingress replica serves HTTP on its own port (no proxy hop) and answers as the proxy and the
single index do."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[cluster]')")

from test_serve_ray import QUERY, _keys, expected, indexes, local_deployment  # noqa: E402,F401


@pytest.fixture(scope="module")
def deployment(indexes):  # noqa: F811
    yield from local_deployment(indexes, {"replicas": 1, "num_cpus": 0.5}, direct_ingress=True)


def test_direct_ingress_answers_without_the_proxy(deployment, indexes, expected):  # noqa: F811
    """The ingress replica's own HTTP server (the URL `ingress_targets` gives a load balancer)
    answers as the proxy does."""
    from service.ray_serve import ingress_targets

    urls = ingress_targets("127.0.0.1")
    assert urls and all(not u.endswith(f":{deployment.base_url.port}") for u in urls)
    with httpx.Client(base_url=urls[0], timeout=60) as direct:
        for q in indexes["queries"][:4]:
            r = direct.post("/search/text", json={"query": q, **QUERY})
            assert r.status_code == 200, r.text
            assert _keys(r.json()) == expected["v1"][q] == _keys(deployment.post("/search/text",
                                                                                 json={"query": q, **QUERY}).json()), q
        assert direct.get("/readyz").status_code == 200

