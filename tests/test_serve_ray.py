"""Ray Serve deployment on a local cluster (2 shards x 2 replicas, fractional CPUs): the ingress
answers exactly like one service over the whole index; a shard replica killed under load is
replaced and no request fails; a new index version rolled out shard by shard never mixes two
versions in one answer; /readyz and /metrics describe the whole deployment."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[cluster]')")

from indexer.searcher import Searcher  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from test_shard_merge import build_shard_indexes, sharded  # noqa: E402

SHARD = {"replicas": 2, "num_cpus": 0.25}
QUERY = {"k": 3, "candidates": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_checkpoint):
    return build_shard_indexes(tmp_path_factory.mktemp("ray-shards"), tiny_checkpoint, versions=2)


def local_deployment(indexes, shard_args: dict, direct_ingress: bool = False):
    """A local cluster (2 CPUs, the way a 2-core CI box looks) serving v1; yields an HTTP client
    of Serve's proxy. `direct_ingress`: the ingress replicas also serve HTTP themselves
    (`service-ray run --direct-ingress`)."""
    monkey = pytest.MonkeyPatch()
    if direct_ingress:
        monkey.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")  # the cluster's processes inherit it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as e:  # Ray's raylet must register within a fixed 30 s: an overloaded box cannot
        ray.shutdown()
        monkey.undo()
        pytest.skip(f"a local Ray node could not start on this machine: {str(e).splitlines()[0]}")
    from service.ray_serve import deploy

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy([str(indexes["shard0"]), str(indexes["shard1"])], "v1", shard_args, {"num_cpus": 0.25})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    serve.shutdown()
    ray.shutdown()
    monkey.undo()


@pytest.fixture(scope="module")
def deployment(indexes):
    yield from local_deployment(indexes, SHARD)


@pytest.fixture(scope="module")
def expected(indexes):
    """Each query's answer from one service over the whole index (v1), and over the v2 shards."""
    whole = TestClient(create_app(ServiceSettings(background_load=False), searcher=Searcher(indexes["whole"])))
    v2 = TestClient(create_app(ServiceSettings(background_load=False),
                               searcher=sharded(indexes, "v2", ("shard0_v2", "shard1_v2"))))
    out = {}
    for name, client in (("v1", whole), ("v2", v2)):
        out[name] = {q: _keys(client.post("/search/text", json={"query": q, **QUERY}).json()) for q in indexes["queries"]}
    assert out["v1"] != out["v2"]
    return out


def _keys(doc: dict) -> list[tuple]:
    return [(h["metadata"].get("n"), round(h["score"], 4)) for h in doc["hits"]]


def test_ray_ingress_answers_like_the_single_index(deployment, indexes, expected):
    for q in indexes["queries"]:
        r = deployment.post("/search/text", json={"query": q, **QUERY})
        assert r.status_code == 200, r.text
        assert _keys(r.json()) == expected["v1"][q], q
        assert r.json()["index"]["index_dir"] == "ray-serve:v1"
    hit = deployment.post("/search/text", json={"query": indexes["queries"][0], "k": 6}).json()["hits"][0]
    item = deployment.get(f"/items/{hit['id']}")
    assert item.status_code == 200 and item.json()["metadata"]["n"] == hit["metadata"]["n"]
    assert deployment.get(hit["image_url"]).content == indexes["images"][hit["metadata"]["n"]].read_bytes()
    r = deployment.post("/search/text", json={"query": "  "})
    assert r.status_code == 422 and r.json()["message"]
    assert "<html" in deployment.get("/").text.lower()


def test_readyz_and_metrics_describe_the_whole_deployment(deployment):
    r = deployment.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True and r.json()["info"]["images"] == 12
    text = deployment.get("/metrics").text
    for app in ("shard0-v1", "shard1-v1"):
        assert f'service_deployment_replicas{{deployment="{app}",state="RUNNING"}} 2.0' in text, text[-2000:]
    assert 'service_deployment_version_info{version="v1"} 1.0' in text and "service_deployment_shards 2.0" in text
    assert "service_requests_total" in text  # the single-box app's own metrics


def _running(app: str) -> int:
    d = serve.status().applications[app].deployments["Shard"]
    return int(d.replica_states.get("RUNNING", 0))


class Load:
    """Queries sent back to back from 2 threads; every answer kept."""

    def __init__(self, client: httpx.Client, queries: list[str]):
        self.client, self.queries, self.answers, self.stop = client, queries, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, i: int) -> None:
        n = i
        while not self.stop.is_set():
            q = self.queries[n % len(self.queries)]
            n += 1
            try:
                r = self.client.post("/search/text", json={"query": q, **QUERY})
                self.answers.append((q, r.status_code, r.json()))
            except Exception as e:  # a lost request (connection reset, timeout) is a failure too
                self.answers.append((q, 0, {"error": repr(e)}))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_a_killed_shard_replica_is_replaced_and_no_request_fails(deployment, indexes, expected):
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "shard0-v1#Shard" in a["name"]]
    assert len(replicas) == 2
    with Load(deployment, indexes["queries"]) as load:
        time.sleep(1.0)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        deadline = time.time() + 120
        time.sleep(1.0)
        while _running("shard0-v1") < 2 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
    assert _running("shard0-v1") == 2, "Serve did not replace the killed replica"
    assert len(load.answers) > 10
    failed = [(q, s, a) for q, s, a in load.answers if s != 200]
    assert not failed, failed[:3]
    assert all(_keys(a) == expected["v1"][q] for q, _, a in load.answers)
    assert deployment.get("/readyz").status_code == 200


def test_a_rollout_never_mixes_versions_in_one_answer(deployment, indexes, expected):
    from service.ray_serve import rollout

    with Load(deployment, indexes["queries"]) as load:
        time.sleep(0.5)
        old = rollout([str(indexes["shard0_v2"]), str(indexes["shard1_v2"])], "v2", {"replicas": 1, "num_cpus": 0.25},
                      {"num_cpus": 0.25}, drain_s=1.0)
        time.sleep(1.0)
    assert sorted(old) == ["shard0-v1", "shard1-v1"]
    assert not set(old) & set(serve.status().applications)
    seen = {"v1": 0, "v2": 0}
    for q, status, doc in load.answers:
        assert status == 200, doc
        version = doc["index"]["index_dir"].split(":")[1]
        assert _keys(doc) == expected[version][q], (version, q)  # wholly one version's answer
        seen[version] += 1
    assert seen["v1"] and seen["v2"], seen
    r = deployment.post("/search/text", json={"query": indexes["queries"][1], **QUERY}).json()
    assert r["index"]["index_dir"] == "ray-serve:v2" and _keys(r) == expected["v2"][indexes["queries"][1]]
    assert deployment.get("/readyz").json()["info"]["images"] == 10


def test_the_kuberay_manifest_is_a_valid_serve_config_of_our_builders():
    """docker/k8s/rayservice.yaml: Serve accepts its serveConfigV2, and every application's
    import_path builds (with its args) the deployments the docs describe."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker/k8s/rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    names = [a.name for a in config.applications]
    assert names == ["shard0-v1", "shard1-v1", "retrieval"]
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        built = getattr(importlib.import_module(module), attr)(app.args)
        deployment = built._bound_deployment
        assert deployment.name == ("Ingress" if app.name == "retrieval" else "Shard")
        if app.name != "retrieval":
            assert deployment.num_replicas == 2 and app.route_prefix is None
    ingress = config.applications[-1].deployments[0]
    assert ingress.name == "Ingress" and ingress.user_config == {"version": "v1", "shards": names[:2]}
