"""The Ray Serve application: the model and index of a registry alias behind HTTP.

    POST /search        {"ref": gallery id | "image": base64 bytes, "text": "...", "k": 10}
                        -> {"version", "k", "text", "results": [{"id", "score", "url"}]}
    GET  /image/{id}    the gallery image, read from its shard by the index's byte range
    GET  /status        the alias, the version in service, the index, a pending version
    GET  /              a page to try it: pick or upload a reference, type the change
    GET  /healthz       {"status": "ok"}: the only endpoint that needs no token

Hostile clients (`composeae.serve.http_limits`, `auth`): with a token (`Access`) every endpoint
but /healthz answers 401 without `Authorization: Bearer <token>`, before any body is read. A
body must declare its length (411 otherwise: Ray Serve's proxy hands the replica a body as fast
as the client sends it, read or not, until the answer goes out), is refused at once over
`Limits.max_body_bytes` (413), and is read as a stream up to that cap within
`Limits.read_timeout_s` (408), so a replica holds at most one capped body per request and a
slow client frees its slot; the body must be a JSON object of the known fields and types.
Reading a body waits on the network, not on the CPU, so a replica takes many requests at once
(`max_ongoing_requests`, 64) and `max_queued_requests` (64) asks Ray Serve to answer 503
beyond that many waiting. (Not seen on Ray 2.60 with one replica: 150 stalled clients were all
held, 64 at a time, each let go by the read timeout; the timeout is what bounds them.) Every
refusal is a 4xx with one sentence, and `composeae.serve.metrics` counts it.

Following the alias: each replica polls the registry's `aliases.json` every `poll_s` seconds
(one small GET). When the alias names another version, the replica loads that version's index
(`<registry>/indexes/<version>/`, built by the nightly job before it moves the alias) and its
model beside the ones in service, then switches one attribute. A request reads that attribute
once and uses what it got to the end, so requests in flight finish on the old model and none
fails; every answer names the version that produced it. The replica compares the alias's
version with the version it loaded for it (not with a field of the index). A version without
an index, or whose index is refused (`composeae.serve.confine`: it names another version,
checkpoint or dataset than the registry's, or points outside its folders), is not switched to:
the replica keeps serving and reports it as pending in `/status`, once; it tries again only
when that index's manifest changes. Polling was chosen over `reconfigure` with a
`user_config`: it needs nobody to redeploy the application after a promotion, and a rollback
(`composeae registry rollback`) reaches the service the same way. Memory during a swap is two
indexes and two models.

Replicas, CPUs per replica and autoscaling are Ray Serve deployment options (`build_app`'s
arguments, or a Serve config file naming `composeae.serve.app:app_builder`). How a replica
searches is its `settings` (`SEARCH_SETTINGS`): `shards` > 1 hands the rows to that many shard
actors (`sharded.ShardedGallery`: exact search, each holding 1/N of the rows, float16 by
default; a swap loads the new version's shards beside the old and switches them together);
`probe`/`rerank` tune an approximate index; `exact` ignores one. `batch` > 1 groups concurrent
requests (`batching.Batcher`: a batch is formed when the previous one has ended, of whatever
arrived meanwhile, so a lone request waits for nothing; `batch_wait_s` > 0 would hold a short
batch that long for more): their queries are embedded in one forward pass and ranked in one
matmul or index call; each request is checked and its reference decoded alone first, so a bad
one fails by itself.

Bad input is answered with HTTP 400 (404 for an unknown gallery id; 401, 408, 411, 413 as
above) and one sentence in `{"error": ...}`; the replica carries on.

(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations as
objects to tell the `Request` parameter from a query parameter. The deployment class comes last:
Ray Serve serialises it when it is decorated, with the module globals that exist by then.)
"""

import hashlib
import html
import json
import logging
import os
import threading
import time
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.concurrency import run_in_threadpool

from composeae import storage
from composeae.errors import UserError
from composeae.registry.store import ModelRegistry
from composeae.serve.auth import TOKEN_ENV, Access, digest, token_from_env
from composeae.serve.batching import Batcher
from composeae.serve.confine import Expected
from composeae.serve.http_limits import Limits, Rejected, parse_query, read_body
from composeae.serve.metrics import ServiceMetrics

log = logging.getLogger("composeae.serve")

PICKER = 48
"""Gallery images offered on the page as references."""

api = FastAPI(title="composeae search")


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def image_url(image_id: str) -> str:
    return "/image/" + quote(image_id, safe="")


SEARCH_SETTINGS = {"shards": 1, "shard_memory": "float16", "shard_cpus": 1.0, "probe": None,
                   "rerank": None, "exact": False, "batch": 16, "batch_wait_s": 0.0}
"""How a replica searches (`SearchService`'s `settings`; the keys of a Serve config's args)."""


def search_settings(given: dict | None) -> dict[str, Any]:
    """`SEARCH_SETTINGS` updated with `given`; `UserError` naming an unknown key."""
    unknown = sorted(set(given or {}) - set(SEARCH_SETTINGS))
    if unknown:
        raise UserError(f"unknown search setting(s) {', '.join(unknown)}; known: "
                        f"{', '.join(SEARCH_SETTINGS)}")
    return {**SEARCH_SETTINGS, **(given or {})}


def load_version(registry_url: str, version: int, settings: dict | None = None):
    """The `Searcher` of registry version `version` (its index and model, searched as
    `settings` say); `UserError` when the version has no index or its index is not the
    version's (another version, checkpoint or dataset, or names outside its folders)."""
    from composeae.serve.index import (checkpoint_file, load_index, read_manifest,
                                       registry_index_url)
    from composeae.serve.search import Searcher

    settings = search_settings(settings)
    record = ModelRegistry(registry_url).version(version)
    url = registry_index_url(registry_url, version)
    if read_manifest(url) is None:
        raise UserError(f"version {version} has no index at {url} (build it with `composeae "
                        f"index --registry {registry_url} --alias {version} --data URL`)")
    expect = Expected(version, checkpoint_file(record["checkpoint"]), index_data(record))
    sharded = int(settings["shards"]) > 1
    index = load_index(url, rows=not sharded, ann=not (sharded or settings["exact"]),
                       expect=expect)
    if not sharded:
        return Searcher.load(index, probe=settings["probe"], rerank=settings["rerank"],
                             exact=settings["exact"])
    from composeae.serve.sharded import ShardedGallery

    gallery = ShardedGallery(url, int(settings["shards"]), settings["shard_memory"],
                             float(settings["shard_cpus"]))
    return Searcher.load(index, gallery=gallery)


def answer_groups(items: list[tuple]) -> list[dict[str, Any]]:
    """Concurrent requests' (searcher, prepared query) pairs answered together: one
    `Searcher.answer` per searcher (a swap can land between two requests of one batch)."""
    results: list[Any] = [None] * len(items)
    groups: dict[int, tuple[Any, list[int]]] = {}
    for i, (searcher, _) in enumerate(items):
        groups.setdefault(id(searcher), (searcher, []))[1].append(i)
    for searcher, members in groups.values():
        for i, answer in zip(members, searcher.answer([items[i][1] for i in members])):
            results[i] = answer
    return results


def index_data(record: dict[str, Any]) -> str | None:
    """The dataset a version's index must be built from: the one `registry add --data` named,
    else the one the version was trained and scored on (None: the record names none)."""
    return ((record.get("index") or {}).get("data")
            or (record.get("data") or {}).get("url"))


def manifest_tag(registry_url: str, version: int) -> str | None:
    """A digest of a version's index manifest (None: no index), so that an index refused once
    is tried again only after it changed."""
    from composeae.serve.index import MANIFEST, registry_index_url

    data, _ = storage.read_tagged(storage.join(registry_index_url(registry_url, version),
                                               MANIFEST))
    return None if data is None else hashlib.sha256(data).hexdigest()


def alias_version(registry_url: str, alias: str) -> int:
    """The version `alias` names in the registry; `UserError` when it names none."""
    aliases = ModelRegistry(registry_url).aliases().aliases
    if alias not in aliases:
        raise UserError(f"registry {registry_url} has no alias {alias!r}")
    return aliases[alias]


def render_page(searcher, alias: str, token: str | None) -> str:
    """The page to try the service: gallery references to pick, an upload, the text, k; its
    script sends `token` (the one the page was opened with) on every request."""
    index = searcher.index
    step = max(1, len(index) // PICKER)
    picks = "".join(
        f'<img class="pick" data-src="{html.escape(image_url(i))}" title="{html.escape(i)}" '
        f'data-id="{html.escape(i)}">' for i in index.ids[::step][:PICKER])
    # JSON in a script: "<" escaped so no value can close the script element.
    script_token = json.dumps(token).replace("<", "\\u003c")
    # The gallery's ids go in last: no id can carry a placeholder into the page.
    return PAGE.replace("{{alias}}", html.escape(alias)).replace(
        "{{version}}", html.escape(str(searcher.version))).replace(
        "{{count}}", str(len(index))).replace("{{token}}", script_token).replace(
        "{{picks}}", picks)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>composeae search</title>
<style>
body { font-family: sans-serif; margin: 1.5em; max-width: 60em; }
img { width: 72px; height: 72px; image-rendering: pixelated; border: 2px solid #ccc; margin: 2px; }
img.pick { cursor: pointer; } img.chosen { border-color: #c00; }
figure { display: inline-block; margin: 0 .5em .8em 0; text-align: center; font-size: 12px; }
#results img { width: 96px; height: 96px; }
.error { color: #c00; }
</style></head><body>
<h1>composeae search</h1>
<p>alias <b>{{alias}}</b>, version {{version}} at page load; {{count}} gallery images.</p>
<form id="query">
<p>1. Pick a reference image (or upload one):</p>
<div id="picks">{{picks}}</div>
<p><label>reference id <input id="ref" name="ref" size="30"></label>
or <input id="upload" type="file" accept="image/png,image/jpeg,image/webp"></p>
<p><label>2. The change: <input id="text" name="text" size="50"
 placeholder="make the red circle blue"></label>
<label>k <input id="k" name="k" type="number" value="10" min="1" max="100"></label>
<button type="submit">search</button></p>
</form>
<p id="answer"></p>
<div id="results"></div>
<script>
// The token this page was opened with (?token=...), sent as a bearer token on every request;
// images come through fetch for the same reason (an <img src> cannot send the header).
const TOKEN = {{token}};
const HEADERS = TOKEN ? {"Authorization": "Bearer " + TOKEN} : {};
async function show(img, url) {
  const response = await fetch(url, {headers: HEADERS});
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}
document.querySelectorAll("img[data-src]").forEach(img => show(img, img.dataset.src));
let upload = null;
document.querySelectorAll("img.pick").forEach(img => img.addEventListener("click", () => {
  document.querySelectorAll("img.chosen").forEach(x => x.classList.remove("chosen"));
  img.classList.add("chosen");
  document.getElementById("ref").value = img.dataset.id;
  upload = null; document.getElementById("upload").value = "";
}));
document.getElementById("upload").addEventListener("change", event => {
  const file = event.target.files[0];
  if (!file) { upload = null; return; }
  const reader = new FileReader();
  reader.onload = () => { upload = reader.result; document.getElementById("ref").value = ""; };
  reader.readAsDataURL(file);
});
document.getElementById("query").addEventListener("submit", async event => {
  event.preventDefault();
  const body = {text: document.getElementById("text").value,
                k: Number(document.getElementById("k").value)};
  if (upload) body.image = upload; else body.ref = document.getElementById("ref").value;
  const answer = document.getElementById("answer"), results = document.getElementById("results");
  results.innerHTML = "";
  const response = await fetch("/search", {method: "POST",
    headers: {...HEADERS, "Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) { answer.className = "error"; answer.textContent = data.error; return; }
  answer.className = "";
  answer.textContent = `top ${data.k}, answered by version ${data.version}`;
  for (const [i, item] of data.results.entries()) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = item.id; img.className = "result"; show(img, item.url);
    const caption = document.createElement("figcaption");
    caption.textContent = `${i + 1}. ${item.id} ${item.score.toFixed(3)}`;
    figure.append(img, caption); results.append(figure);
  }
});
</script>
</body></html>
"""


@serve.deployment(name="SearchService", max_ongoing_requests=64, max_queued_requests=64,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SearchService:
    """One replica: the searcher in service, swapped when the alias moves."""

    def __init__(self, registry: str, alias: str = "champion", poll_s: float = 10.0,
                 settings: dict | None = None, access: Access | None = None,
                 limits: Limits | None = None):
        if access is None:
            raise UserError("the search service needs its access rule (a token's digest, or "
                            "Access(None) to serve open)")
        self.registry, self.alias, self.poll_s = registry, alias, poll_s
        self.access, self.limits = access, limits or Limits()
        self.metrics = ServiceMetrics(alias)
        self.started = time.time()
        from composeae.serve.search import use_assigned_cpus

        self.settings = search_settings(settings)
        use_assigned_cpus()  # threads as the replica's CPUs, not the machine's cores
        self.batch = int(self.settings["batch"])
        self.batcher = Batcher(answer_groups, self.batch, float(self.settings["batch_wait_s"]))
        self.loaded = alias_version(registry, alias)
        """The alias's version that `current` was loaded for."""
        self.current = load_version(registry, self.loaded, self.settings)
        self.pending: str | None = None
        self.refused: tuple[int, str | None] | None = None
        """(version, manifest digest) of the index last refused: not loaded again until either
        changes."""
        self.swaps = self.load_attempts = 0
        self.metrics.serving(self.loaded, swapped=False)
        self._stop = threading.Event()
        threading.Thread(target=self._follow, name="follow-alias", daemon=True).start()

    # -- following the alias ---------------------------------------------------------------------
    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_alias()
            except Exception as exc:  # the registry unreachable for a moment: keep serving
                log.warning("could not check alias %s of %s: %s", self.alias, self.registry, exc)

    def check_alias(self) -> None:
        version = alias_version(self.registry, self.alias)
        if version == self.loaded:
            self.pending = self.refused = None
            return
        attempt = (version, manifest_tag(self.registry, version))
        if attempt == self.refused:
            return  # refused already, and its index has not changed since
        self.load_attempts += 1
        try:
            started = time.monotonic()
            # beside the one in service (sharded: new shard actors beside the old ones)
            searcher = load_version(self.registry, version, self.settings)
        except UserError as exc:
            self.pending, self.refused = str(exc), attempt
            log.warning("alias %s: not switching to version %s: %s", self.alias, version, exc)
            return
        previous, self.current = self.loaded, searcher  # the one switch
        self.loaded = version
        self.pending, self.refused, self.swaps = None, None, self.swaps + 1
        self.metrics.serving(version, swapped=True)
        log.info("alias %s: version %s -> %s (loaded in %.1f s)", self.alias, previous, version,
                 time.monotonic() - started)

    def __del__(self):
        self._stop.set()

    # -- HTTP ------------------------------------------------------------------------------------
    async def _guarded(self, route: str, request: Request, work) -> Response:
        """The token checked (before any of the body is read), then `work()`; every refusal
        becomes its status and sentence, and every answer is counted."""
        started = time.perf_counter()
        try:
            if not self.access.allows(request.headers.get("authorization"),
                                      request.query_params.get("token") if route == "page"
                                      else None):
                raise Rejected(401, "this service needs its token: send the header "
                                    "Authorization: Bearer TOKEN")
            response = await work()
        except Rejected as exc:
            response = _error(exc.status, exc.message)
        self.metrics.request(route, response.status_code, time.perf_counter() - started)
        return response

    @api.post("/search")
    async def search(self, request: Request) -> Response:
        return await self._guarded("search", request, lambda: self._search(request))

    async def _search(self, request: Request) -> Response:
        from composeae.serve.index import UnknownImage

        query = parse_query(await read_body(request, self.limits))
        searcher = self.current  # read once: a swap during this request does not affect it
        try:
            prepared = await run_in_threadpool(searcher.prepare, query["text"], query["k"],
                                               ref=query["ref"], image=query["image"])
            if self.batch > 1:
                result = await self.batcher((searcher, prepared))
            else:
                result = (await run_in_threadpool(searcher.answer, [prepared]))[0]
        except UnknownImage as exc:
            raise Rejected(404, str(exc)) from None
        except UserError as exc:
            raise Rejected(400, str(exc)) from None
        for item in result["results"]:
            item["url"] = image_url(item["id"])
        return JSONResponse(result)

    @api.get("/image/{image_id:path}")
    async def image(self, image_id: str, request: Request) -> Response:
        async def work() -> Response:
            searcher = self.current
            row = searcher.index.row_of.get(image_id)
            if row is None:
                raise Rejected(404, f"no gallery image {image_id[:200]!r}")
            data, mime = await run_in_threadpool(searcher.index.image, row)
            return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})
        return await self._guarded("image", request, work)

    @api.get("/status")
    async def status(self, request: Request) -> Response:
        async def work() -> Response:
            index = self.current.index
            return JSONResponse({
                "alias": self.alias, "registry": self.registry, "version": self.current.version,
                "index": index.url, "count": len(index), "swaps": self.swaps,
                "load_attempts": self.load_attempts,
                "pending": self.pending, "search": self.current.method, "batch": self.batch,
                "batches": self.batcher.batches, "batched_requests": self.batcher.items,
                "largest_batch": self.batcher.largest, "mean_batch": round(self.batcher.mean, 2),
                "replica": {"pid": os.getpid(), "started": self.started}})
        return await self._guarded("status", request, work)

    @api.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        async def work() -> Response:
            return JSONResponse({"status": "ok"})
        started = time.perf_counter()
        response = await work()
        self.metrics.request("healthz", response.status_code, time.perf_counter() - started)
        return response

    @api.get("/")
    async def page(self, request: Request) -> Response:
        async def work() -> Response:
            authorization = request.headers.get("authorization", "")
            token = (authorization.partition(" ")[2].strip() or None if authorization
                     else request.query_params.get("token"))
            return HTMLResponse(render_page(self.current, self.alias,
                                            None if self.access.open else token))
        return await self._guarded("page", request, work)


def build_app(registry: str, alias: str = "champion", *, poll_s: float = 10.0,
              num_replicas: int | str = 1, num_cpus: float = 1.0,
              autoscaling: dict | None = None, settings: dict | None = None,
              access: Access, limits: Limits | None = None,
              max_ongoing_requests: int | None = None, max_queued_requests: int | None = None):
    """The bound application (`serve.run(build_app(...))`). `num_replicas="auto"` or an
    `autoscaling` dict hands the replica count to Ray Serve's autoscaler; `settings`: how each
    replica searches (`SEARCH_SETTINGS`); `access`: who may call (`Access(digest(token))`, or
    `Access(None)` to serve open); `limits`: what a request may cost."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus}}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    if max_ongoing_requests is not None:
        options["max_ongoing_requests"] = max_ongoing_requests
    if max_queued_requests is not None:
        options["max_queued_requests"] = max_queued_requests
    return SearchService.options(**options).bind(registry, alias, poll_s,
                                                 search_settings(settings), access, limits)


def app_builder(args: dict[str, str]):
    """For Serve config files: `import_path: composeae.serve.app:app_builder` with
    `args: {registry: URL, alias: champion, poll_s: 10}` and any of `SEARCH_SETTINGS`
    (`shards: 4`, `probe: 64`, `batch: 32`, ...); replicas and autoscaling go under the
    config's `deployments: [{name: SearchService, ...}]`.

    The token comes from the environment variable `token_env` (default
    `COMPOSEAE_SERVE_TOKEN`, which the cluster's nodes get from a secret); the replicas are
    given only its sha256. Without it the application is refused, unless the args say
    `insecure: true`. `read_timeout_s` and `max_body_bytes` set the request `Limits`."""
    own = ("registry", "alias", "poll_s", "token_env", "insecure", "read_timeout_s",
           "max_body_bytes")
    settings = {key: value for key, value in args.items() if key not in own}
    token_env = str(args.get("token_env", TOKEN_ENV))
    token = token_from_env(token_env)
    insecure = str(args.get("insecure", False)).lower() in ("true", "1", "yes")
    if token is None and not insecure:
        raise UserError(f"the search service needs a token: set ${token_env} on the nodes (from "
                        f"a secret), or `insecure: true` in the args to serve it open")
    defaults = Limits()
    limits = Limits(max_body_bytes=int(args.get("max_body_bytes", defaults.max_body_bytes)),
                    read_timeout_s=float(args.get("read_timeout_s", defaults.read_timeout_s)))
    return SearchService.bind(args["registry"], args.get("alias", "champion"),
                              float(args.get("poll_s", 10)), search_settings(settings),
                              Access(None if token is None else digest(token)), limits)
