"""The search service's own metrics, as Ray metrics (`ray.util.metrics`): each node's metrics
agent exports them to Prometheus with Ray's `ray_` prefix, and the Ray dashboard's Grafana
panels read them from there.

    composeae_serve_requests     counter, by route and HTTP status code: every answered request
    composeae_serve_errors       counter, by route and code: the answers of 400 and above
    composeae_serve_latency_s    histogram, by route: seconds from the request to its answer
    composeae_serve_swaps        counter, by alias: models swapped in when the alias moved
    composeae_serve_version      gauge, by alias: the registry version in service

Created inside a replica (Ray metrics belong to the process that records them).
"""

from __future__ import annotations

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class ServiceMetrics:
    """The replica's metric objects and the one call per request that records them."""

    def __init__(self, alias: str):
        from ray.util import metrics

        self.alias = alias
        self.requests = metrics.Counter("composeae_serve_requests", "answered requests",
                                        tag_keys=("route", "code"))
        self.errors = metrics.Counter("composeae_serve_errors", "answers with status >= 400",
                                      tag_keys=("route", "code"))
        self.latency = metrics.Histogram("composeae_serve_latency_s", "seconds to answer",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.swaps = metrics.Counter("composeae_serve_swaps", "models swapped in",
                                     tag_keys=("alias",))
        self.version = metrics.Gauge("composeae_serve_version", "registry version in service",
                                     tag_keys=("alias",))

    def request(self, route: str, code: int, seconds: float) -> None:
        tags = {"route": route, "code": str(code)}
        self.requests.inc(tags=tags)
        if code >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(seconds, tags={"route": route})

    def serving(self, version: int | None, swapped: bool) -> None:
        if swapped:
            self.swaps.inc(tags={"alias": self.alias})
        if version is not None:
            self.version.set(version, tags={"alias": self.alias})
