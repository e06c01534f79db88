"""Serving beyond one machine on Ray Serve: one application per index shard, one ingress.

    service-ray run --shard /idx/part0 --shard /idx/part1 --replicas 2 --port 8000
    service-ray rollout --address auto --version v2 --shard /idx2/part0 --shard /idx2/part1

Layout. Shard s of index version V is the Serve application `shard{s}-{V}` (route_prefix None):
one deployment `Shard` whose replicas each hold a `Searcher` over that shard's directory
(`num_replicas` or autoscaling bounds, fractional `num_cpus`, `num_gpus` where the cluster has
GPUs). The application `retrieval` (route_prefix "/") is the ingress: the ordinary single-box
FastAPI app (`service.app.create_app`) over a `service.ray_backend.ShardedBackend` that encodes
the query once, fans it out to every shard through deployment handles, and merges exactly
(`service.shard_merge`). So the API, its errors and the web page are the single box's.

Versions and rollout. The ingress learns which shard applications to use from its
`user_config` (`{"version": V, "shards": ["shard0-V", ...]}`); a change of it is applied in
place (`reconfigure`, no restart): the replica connects to the new shards, checks that each one
answers and serves V, and swaps its backend in one assignment (the engine's handle). A request
reads that handle once, so it is answered wholly by V-1 or wholly by V, never a mix. A rollout
(`rollout`) therefore: deploys the new version's shard applications one shard at a time next to
the old ones (each must be running before the next starts), switches the ingress, waits for
in-flight requests to drain, then deletes the old shard applications. Both versions are loaded
during the switch (blue-green per shard: plan the memory for it).

Replica loss. Serve replaces a dead replica. A request that was on it fails at the handle with
an actor error; the search is read-only, so the shard call is retried (`RETRIES` times, short
backoff) and Serve routes the retry to a live replica: no request is lost while a shard has one.
A shard with no live replica at all answers 503 with Retry-After (`ShardUnavailable`), which a
client's retry answers once Serve has started a replacement. `/readyz` is 503 while any shard
of the served version has no running replica, and `/metrics` adds the deployment's replicas per
shard and state, the shard-call retries and the served version to the ingress's own metrics.

The same applications from a Serve config file (`serve deploy`, KubeRay's RayService):
`service.ray_serve:shard_app` (args: index_dir, version, replicas, ...) and
`service.ray_serve:ingress_app` (args: settings; the `Ingress` deployment's user_config names
the version and shard applications): docker/k8s/rayservice.yaml.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from .app import create_app
from .engine import warm_up
from .ray_backend import ShardedBackend, ShardServer, ShardUnavailable, check_shards, ingress_encoder
from .settings import ServiceSettings

log = logging.getLogger("service.ray_serve")
INGRESS_APP = "retrieval"
INGRESS_CODE_VERSION = "service-ray-ingress-1"  # fixed: a new user_config is then applied in place
RETRIES = 3
TRANSIENT = (RayActorError, ActorUnavailableError, DeploymentUnavailableError, ReplicaUnavailableError)


def shard_app_name(shard: int, version: str) -> str:
    return f"shard{shard}-{version}"


# --- the shard deployment ------------------------------------------------------------------------
# Serve's per-request access log is off (a file write per request and per hop; the ingress
# app's metrics count requests): warnings and errors are still logged
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


@serve.deployment(name="Shard", max_ongoing_requests=16, graceful_shutdown_timeout_s=20, logging_config=QUIET)
class Shard(ShardServer):
    """One replica of one shard: `ShardServer` (a `Searcher` over the shard's directory; its
    methods are the handle's). Sync methods run on Serve's thread pool, so a replica overlaps
    its FAISS and re-rank calls."""


class _Pending:
    def __init__(self, shard: "RayShard", method: str, args: tuple):
        self.shard, self.method, self.args = shard, method, args
        self.response = shard.call(method, args)

    def result(self) -> Any:
        """Blocks: called on the app's executor threads (`Engine.run`), never on the event loop."""
        for attempt in range(RETRIES + 1):
            try:
                return self.response.result(timeout_s=self.shard.timeout_s)
            except RayTaskError as e:  # the shard's own exception (e.g. SearchError: a 4xx), unwrapped
                raise (e.cause if isinstance(e.cause, BaseException) else e) from None
            except TimeoutError:
                raise ShardUnavailable(f"shard {self.shard.index} did not answer within {self.shard.timeout_s} s")\
                    from None
            except TRANSIENT as e:
                if attempt == RETRIES:
                    raise ShardUnavailable(f"shard {self.shard.index} unavailable (no replica answered: "
                                           f"{type(e).__name__})") from None
                self.shard.retried()
                time.sleep(0.05 * 2 ** attempt)
                self.response = self.shard.call(self.method, self.args)


class RayShard:
    """A `ShardedBackend` shard client over a Serve deployment handle, with the retry rule above."""

    def __init__(self, index: int, app_name: str, timeout_s: float = 30.0, on_retry: Any = None):
        self.index, self.app_name, self.timeout_s = index, app_name, timeout_s
        self.handle = serve.get_deployment_handle("Shard", app_name=app_name)
        self.on_retry = on_retry

    def call(self, method: str, args: tuple) -> Any:
        return getattr(self.handle, method).remote(*args)

    def submit(self, method: str, *args: Any) -> _Pending:
        return _Pending(self, method, args)

    def retried(self) -> None:
        if self.on_retry is not None:
            self.on_retry(self.index)


# --- the ingress -----------------------------------------------------------------------------------
class DeploymentView:
    """What the ingress adds to `/readyz` and `/metrics`: the whole deployment's state, read from
    the Serve controller (cached for a second)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.replicas = Gauge("service_deployment_replicas", "replicas per shard (and the ingress) by state",
                              ["deployment", "state"], registry=self.registry)
        self.shards = Gauge("service_deployment_shards", "shards of the served index version", registry=self.registry)
        self.version = Gauge("service_deployment_version_info", "the served index version", ["version"],
                             registry=self.registry)
        self.retries = Counter("service_shard_retries_total", "shard calls retried after a replica failed",
                               ["shard"], registry=self.registry)
        self.apps: list[str] = []
        self.served = ""
        self._cached: tuple[float, dict[str, dict[str, int]]] = (0.0, {})
        self._lock = threading.Lock()

    def serve_as(self, version: str, apps: list[str]) -> None:
        self.version.clear()
        self.version.labels(version).set(1)
        self.shards.set(len(apps))
        self.apps, self.served = list(apps), version

    def states(self) -> dict[str, dict[str, int]]:
        """{application: {replica state: count}} for the served shards and the ingress."""
        with self._lock:
            at, states = self._cached
            if time.monotonic() - at > 1.0:
                status = serve.status().applications
                states = {}
                for app in [*self.apps, INGRESS_APP]:
                    deps = status[app].deployments if app in status else {}
                    counts: dict[str, int] = {}
                    for d in deps.values():
                        for state, n in (d.replica_states or {}).items():
                            key = getattr(state, "value", str(state))
                            counts[key] = counts.get(key, 0) + int(n)
                    states[app] = counts
                self._cached = (time.monotonic(), states)
            return states

    def not_ready(self) -> list[str]:
        states = self.states()
        return [app for app in self.apps if states.get(app, {}).get("RUNNING", 0) < 1]

    def render(self) -> bytes:
        self.replicas.clear()
        for app, counts in self.states().items():
            for state, n in counts.items():
                self.replicas.labels(app, state).set(n)
        return generate_latest(self.registry)


class DeploymentAware:
    """ASGI wrapper of the single-box app: `/readyz` is 503 while a shard has no running
    replica; `/metrics` (when the app serves it: same key rules) gets the deployment's gauges."""

    def __init__(self, app: Any, view: DeploymentView):
        self.app, self.view = app, view

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path") if scope.get("type") == "http" and scope.get("method") == "GET" else None
        if path == "/readyz" and self.view.apps:
            down = await asyncio.to_thread(self.view.not_ready)
            if down:
                body = json.dumps({"ready": False, "message": f"shards without a running replica: {down}"}).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        if path != "/metrics":
            await self.app(scope, receive, send)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def buffer(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, buffer)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body += await asyncio.to_thread(self.view.render)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@serve.deployment(name="Ingress", max_ongoing_requests=64, logging_config=QUIET)
@serve.ingress()
class Ingress:
    """The single-box app over a `ShardedBackend`; `user_config` = {"version", "shards"}."""

    def __init__(self, settings: dict | None = None, timeout_s: float = 30.0):
        # SERVICE_* variables (the replica's runtime_env) apply as on one box; rollouts replace
        # the admin hot swap, and no index directory is opened here
        self.settings = ServiceSettings(**{**(settings or {}), "index_dir": None, "allow_admin": False})
        self.service_app = create_app(self.settings)  # (`app` is the Serve wrapper's)
        self.engine = self.service_app.state.engine
        self.view = DeploymentView()
        self.timeout_s = timeout_s
        self.encoder: Any = None
        self.digest: str | None = None

    def __serve_build_asgi_app__(self) -> Any:
        return DeploymentAware(self.service_app, self.view)

    async def reconfigure(self, config: dict) -> None:
        version, apps = str(config["version"]), list(config["shards"])
        if version == self.view.served and apps == self.view.apps:
            return
        shards = [RayShard(s, app, self.timeout_s, on_retry=lambda s: self.view.retries.labels(str(s)).inc())
                  for s, app in enumerate(apps)]
        described = list(await asyncio.gather(*(s.handle.describe.remote() for s in shards)))
        check_shards(described, version)
        if described[0].get("checkpoint_digest") != self.digest:  # the model changed (or first config)
            self.encoder = await asyncio.to_thread(ingress_encoder, described[0].get("checkpoint"), self.settings)
            self.digest = described[0].get("checkpoint_digest")
        backend = ShardedBackend(shards, self.encoder, version, described=described)
        await asyncio.to_thread(warm_up, backend)  # every shard answers a query before the swap
        self.engine.install(backend, Path(f"ray-serve:{version}"))
        self.view.serve_as(version, apps)
        log.info("serving index version %s from %d shards", version, len(apps))


# --- applications (Python API and Serve config files) ---------------------------------------------
def _options(args: dict) -> dict:
    """Deployment options from a config's args: replicas (or autoscaling bounds), CPUs, GPUs."""
    # user code on the replica's own event loop: one thread hop less per call
    actor: dict[str, Any] = {"num_cpus": float(args.get("num_cpus", 1.0)),
                             "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    if float(args.get("num_gpus", 0) or 0) > 0:
        actor["num_gpus"] = float(args["num_gpus"])
    opts: dict[str, Any] = {"ray_actor_options": actor}
    if args.get("min_replicas") is not None or args.get("max_replicas") is not None:
        opts["autoscaling_config"] = {"min_replicas": int(args.get("min_replicas") or 1),
                                      "max_replicas": int(args.get("max_replicas") or args.get("min_replicas") or 1),
                                      "target_ongoing_requests": float(args.get("target_ongoing_requests", 4))}
        opts["num_replicas"] = "auto"
    else:
        opts["num_replicas"] = int(args.get("replicas", 1))
    return opts


def shard_app(args: dict) -> Any:
    """Serve app builder of one shard: args index_dir, version, and `_options`' keys."""
    return Shard.options(**_options(args)).bind(str(args["index_dir"]), str(args.get("version", "v1")))


def ingress_app(args: dict) -> Any:
    """Serve app builder of the ingress: args settings (ServiceSettings keys), timeout_s, and
    `_options`' keys; user_config {"version", "shards"} (set here from args, or in the config)."""
    opts = _options({"num_cpus": 0.25, **args})
    if args.get("version") is not None:
        opts["user_config"] = {"version": str(args["version"]), "shards": list(args["shards"])}
    return Ingress.options(**opts, version=INGRESS_CODE_VERSION, _internal=True).bind(
        args.get("settings") or {}, float(args.get("timeout_s", 30.0)))


def shard_apps() -> dict[int, list[str]]:
    """The running shard applications, by version position: {shard: [app names]}."""
    out: dict[int, list[str]] = {}
    for name in serve.status().applications:
        head, _, _ = name.partition("-")
        if head.startswith("shard") and head[5:].isdigit():
            out.setdefault(int(head[5:]), []).append(name)
    return out


def deploy_shards(index_dirs: list[str], version: str, shard_args: dict) -> list[str]:
    """The version's shard applications, one shard at a time (each running before the next)."""
    names = []
    for s, d in enumerate(index_dirs):
        name = shard_app_name(s, version)
        serve.run(shard_app({**shard_args, "index_dir": str(d), "version": version}), name=name, route_prefix=None)
        names.append(name)
    return names


def ingress_targets(host: str | None = None, wait_s: float = 30.0) -> list[str]:
    """With direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1` in the cluster's environment),
    the URLs at which the ingress replicas serve HTTP themselves: what a load balancer (a
    Kubernetes Service, HAProxy) points at, one hop fewer than Serve's proxy. Without it, the
    proxies' URLs. From the Serve controller's target groups (a Ray alpha API). `host`: the
    HTTP host Serve was started with (a replica listens there; all interfaces: the node's IP)."""
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    end = time.monotonic() + wait_s
    while True:  # a replica's port is allocated shortly after it starts
        groups = ray.get(controller.get_target_groups.remote(INGRESS_APP))
        urls = [f"http://{t.ip if host in (None, '0.0.0.0', '::') else host}:{t.port}" for g in groups
                if str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP" for t in g.targets]
        if urls or time.monotonic() > end:
            return urls
        time.sleep(0.5)


def deploy(index_dirs: list[str], version: str = "v1", shard_args: dict | None = None,
           ingress_args: dict | None = None) -> None:
    """Shards, then the ingress that serves them."""
    names = deploy_shards(index_dirs, version, shard_args or {})
    serve.run(ingress_app({**(ingress_args or {}), "version": version, "shards": names}), name=INGRESS_APP,
              route_prefix="/")


def rollout(index_dirs: list[str], version: str, shard_args: dict | None = None, ingress_args: dict | None = None,
            drain_s: float = 2.0) -> list[str]:
    """Roll version `version` out shard by shard, switch the ingress, drain, delete the old
    shard applications (returns their names). See the module doc."""
    old = [name for names in shard_apps().values() for name in names
           if not name.endswith(f"-{version}")]
    names = deploy_shards(index_dirs, version, shard_args or {})
    serve.run(ingress_app({**(ingress_args or {}), "version": version, "shards": names}), name=INGRESS_APP,
              route_prefix="/")
    time.sleep(drain_s)  # requests that read the old backend just before the switch finish on it
    for name in old:
        serve.delete(name)
    return old


# --- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="service-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "start (or join) a Ray cluster, deploy the shards and the ingress, serve"),
                        ("rollout", "roll a new index version out on a running deployment, shard by shard")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--shard", action="append", required=True, type=Path,
                       help="index directory of one shard, in shard order (repeat per shard)")
        c.add_argument("--version", default="v1", help="index version label (default v1)")
        c.add_argument("--address", help="Ray cluster address (default: start a local one; 'auto': the running one)")
        c.add_argument("--replicas", type=int, default=1, help="replicas per shard (default 1)")
        c.add_argument("--min-replicas", type=int, help="autoscale each shard from this many replicas ...")
        c.add_argument("--max-replicas", type=int, help="... up to this many")
        c.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per shard replica (fractions allowed)")
        c.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per shard replica (untested on GPU)")
        c.add_argument("--ingress-replicas", type=int, default=1)
        c.add_argument("--ingress-cpus", type=float, default=0.25)
        c.add_argument("--direct-ingress", action="store_true",
                       help="the ingress replicas serve HTTP themselves on ports Serve allocates (printed), no "
                            "proxy hop (Ray's RAY_SERVE_ENABLE_DIRECT_INGRESS; a cluster started elsewhere needs "
                            "that variable set when it starts)")
        c.add_argument("--host", default="127.0.0.1")
        c.add_argument("--port", type=int, default=8000)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    missing = [str(d) for d in a.shard if not (d / "manifest.json").is_file()]
    if missing:
        print(f"service-ray: not an index directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    if a.direct_ingress:  # read by the Serve controller and replicas: set before the cluster starts
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(address=a.address, include_dashboard=False, ignore_reinit_error=True)
    shard_args = {"replicas": a.replicas, "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                  "num_cpus": a.num_cpus, "num_gpus": a.num_gpus}
    ingress_args = {"replicas": a.ingress_replicas, "num_cpus": a.ingress_cpus}
    dirs = [str(d.resolve()) for d in a.shard]
    if a.command == "rollout":
        old = rollout(dirs, a.version, shard_args, ingress_args)
        print(f"service-ray: serving version {a.version}; removed {', '.join(old) or 'nothing'}", file=sys.stderr)
        return 0
    serve.start(http_options={"host": a.host, "port": a.port})
    deploy(dirs, a.version, shard_args, ingress_args)
    urls = ingress_targets(a.host) if a.direct_ingress else [f"http://{a.host}:{a.port}/"]
    print(f"service-ray: serving {len(dirs)} shards on {', '.join(urls)} (Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
