"""The Ray Serve application: the model and index of a registry alias behind HTTP.

    POST /search        {"ref": gallery id | "image": base64 bytes, "text": "...", "k": 10}
                        -> {"version", "k", "text", "results": [{"id", "score", "url"}]}
    GET  /image/{id}    the gallery image, read from its shard by the index's byte range
    GET  /status        the alias, the version in service, the index, a pending version
    GET  /              a page to try it: pick or upload a reference, type the change

Following the alias: each replica polls the registry's `aliases.json` every `poll_s` seconds
(one small GET). When the alias names another version, the replica loads that version's index
(`<registry>/indexes/<version>/`, built by the nightly job before it moves the alias) and its
model beside the ones in service, then switches one attribute. A request reads that attribute
once and uses what it got to the end, so requests in flight finish on the old model and none
fails; every answer names the version that produced it. A version without an index (or one
that fails to load) is not switched to: the replica keeps serving and reports it as pending in
`/status`, and tries again at the next poll. Polling was chosen over `reconfigure` with a
`user_config`: it needs nobody to redeploy the application after a promotion, and a rollback
(`composeae registry rollback`) reaches the service the same way. Memory during a swap is two
indexes and two models.

Replicas, CPUs per replica and autoscaling are Ray Serve deployment options (`build_app`'s
arguments, or a Serve config file naming `composeae.serve.app:app_builder`). How a replica
searches is its `settings` (`SEARCH_SETTINGS`): `shards` > 1 hands the rows to that many shard
actors (`sharded.ShardedGallery`: exact search, each holding 1/N of the rows, float16 by
default; a swap loads the new version's shards beside the old and switches them together);
`probe`/`rerank` tune an approximate index; `exact` ignores one. `batch` > 1 groups concurrent
requests (`@serve.batch`, waiting at most `batch_wait_s` for more: with 5 ms, batches held 1.1
requests on average under 8 clients and gained nothing; 50 ms gathered about 8 and doubled the
requests/s, at up to 50 ms more for a lone request): their queries are embedded
in one forward pass and ranked in one matmul or index call; each request is checked and its
reference decoded alone first, so a bad one fails by itself.

Bad input is answered with HTTP 400 (404 for an unknown gallery id) and one sentence in
`{"error": ...}`; the replica carries on.

(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations as
objects to tell the `Request` parameter from a query parameter. The deployment class comes last:
Ray Serve serialises it when it is decorated, with the module globals that exist by then.)
"""

import base64
import binascii
import html
import json
import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.concurrency import run_in_threadpool

from composeae.errors import UserError
from composeae.registry.store import ModelRegistry

log = logging.getLogger("composeae.serve")

MAX_IMAGE_BYTES = 4 * 2**20
"""Largest uploaded reference image (decoded bytes)."""
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024
"""Largest request body: the image in base64 and the rest of the JSON."""
PICKER = 48
"""Gallery images offered on the page as references."""

api = FastAPI(title="composeae search")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


SEARCH_SETTINGS = {"shards": 1, "shard_memory": "float16", "shard_cpus": 1.0, "probe": None,
                   "rerank": None, "exact": False, "batch": 16, "batch_wait_s": 0.05}
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
    `settings` say); `UserError` when the version has no index."""
    from composeae.serve.index import load_index, registry_index_url
    from composeae.serve.search import Searcher

    settings = search_settings(settings)
    url = registry_index_url(registry_url, version)
    sharded = int(settings["shards"]) > 1
    try:
        index = load_index(url, rows=not sharded, ann=not (sharded or settings["exact"]))
    except UserError:
        raise UserError(f"version {version} has no index at {url} (build it with `composeae "
                        f"index --registry {registry_url} --alias {version} --data URL`)") from None
    if not sharded:
        return Searcher.load(index, probe=settings["probe"], rerank=settings["rerank"],
                             exact=settings["exact"])
    from composeae.serve.sharded import ShardedGallery

    gallery = ShardedGallery(url, int(settings["shards"]), settings["shard_memory"],
                             float(settings["shard_cpus"]))
    return Searcher.load(index, gallery=gallery)


def alias_version(registry_url: str, alias: str) -> int:

    aliases = ModelRegistry(registry_url).aliases().aliases
    if alias not in aliases:
        raise UserError(f"registry {registry_url} has no alias {alias!r}")
    return aliases[alias]


def _decode_image(value: Any) -> bytes | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UserError("image must be base64 text")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UserError(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image is not valid base64") from None


def render_page(searcher, alias: str) -> str:
    """The page to try the service: gallery references to pick, an upload, the text, k."""
    index = searcher.index
    step = max(1, len(index) // PICKER)
    picks = "".join(
        f'<img class="pick" src="/image/{html.escape(i)}" title="{html.escape(i)}" '
        f'data-id="{html.escape(i)}">' for i in index.ids[::step][:PICKER])
    return PAGE.replace("{{picks}}", picks).replace("{{alias}}", html.escape(alias)).replace(
        "{{version}}", str(searcher.version)).replace("{{count}}", str(len(index)))


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
or <input id="upload" type="file" accept="image/*"></p>
<p><label>2. The change: <input id="text" name="text" size="50"
 placeholder="make the red circle blue"></label>
<label>k <input id="k" name="k" type="number" value="10" min="1" max="100"></label>
<button type="submit">search</button></p>
</form>
<p id="answer"></p>
<div id="results"></div>
<script>
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
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) { answer.className = "error"; answer.textContent = data.error; return; }
  answer.className = "";
  answer.textContent = `top ${data.k}, answered by version ${data.version}`;
  for (const [i, item] of data.results.entries()) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = item.url; img.alt = item.id; img.className = "result";
    const caption = document.createElement("figcaption");
    caption.textContent = `${i + 1}. ${item.id} ${item.score.toFixed(3)}`;
    figure.append(img, caption); results.append(figure);
  }
});
</script>
</body></html>
"""


@serve.deployment(name="SearchService", max_ongoing_requests=16,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SearchService:
    """One replica: the searcher in service, swapped when the alias moves."""

    def __init__(self, registry: str, alias: str = "champion", poll_s: float = 10.0,
                 settings: dict | None = None):
        from composeae.serve.search import use_assigned_cpus

        self.registry, self.alias, self.poll_s = registry, alias, poll_s
        self.settings = search_settings(settings)
        use_assigned_cpus()  # threads as the replica's CPUs, not the machine's cores
        self.batch = int(self.settings["batch"])
        self.largest_batch = self.batches = self.batched = 0
        if self.batch > 1:
            self._batched.set_max_batch_size(self.batch)
            self._batched.set_batch_wait_timeout_s(float(self.settings["batch_wait_s"]))
        self.current = load_version(registry, alias_version(registry, alias), self.settings)
        self.pending: str | None = None
        self.swaps = 0
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
        if version == self.current.version:
            self.pending = None
            return
        try:
            started = time.monotonic()
            # beside the one in service (sharded: new shard actors beside the old ones)
            searcher = load_version(self.registry, version, self.settings)
        except UserError as exc:
            self.pending = str(exc)
            return
        previous, self.current = self.current.version, searcher  # the one switch
        self.pending, self.swaps = None, self.swaps + 1
        log.info("alias %s: version %s -> %s (loaded in %.1f s)", self.alias, previous, version,
                 time.monotonic() - started)

    def __del__(self):
        self._stop.set()

    # -- HTTP ------------------------------------------------------------------------------------
    @api.post("/search")
    async def search(self, request: Request) -> Response:
        from composeae.serve.index import UnknownImage

        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(400, f"the request is larger than {MAX_BODY_BYTES} bytes")
        try:
            query = json.loads(body or b"{}")
            if not isinstance(query, dict):
                raise ValueError
        except ValueError:
            return _error(400, "the request body must be a JSON object")
        searcher = self.current  # read once: a swap during this request does not affect it
        try:
            image = _decode_image(query.get("image"))
            ref = query.get("ref")
            if ref is not None and not isinstance(ref, str):
                raise UserError("ref must be a gallery id (a string)")
            text = query.get("text")
            if text is not None and not isinstance(text, str):
                raise UserError("text must be a string")
            prepared = await run_in_threadpool(searcher.prepare, text, query.get("k", 10),
                                               ref=ref or None, image=image)
            result = await self._answer(searcher, prepared)
        except UnknownImage as exc:
            return _error(404, str(exc))
        except UserError as exc:
            return _error(400, str(exc))
        for item in result["results"]:
            item["url"] = f"/image/{item['id']}"
        return JSONResponse(result)

    async def _answer(self, searcher, query) -> dict[str, Any]:
        if self.batch > 1:
            return await self._batched((searcher, query))
        return (await run_in_threadpool(searcher.answer, [query]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[tuple]) -> list[dict[str, Any]]:
        """Concurrent requests' (searcher, prepared query) pairs answered together: one call per
        searcher (a swap can land between two requests of one batch)."""
        results: list[Any] = [None] * len(items)
        self.largest_batch = max(self.largest_batch, len(items))
        self.batches, self.batched = self.batches + 1, self.batched + len(items)
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, (searcher, _) in enumerate(items):
            groups.setdefault(id(searcher), (searcher, []))[1].append(i)
        for searcher, members in groups.values():
            answers = await run_in_threadpool(searcher.answer, [items[i][1] for i in members])
            for i, answer in zip(members, answers):
                results[i] = answer
        return results

    @api.get("/image/{image_id:path}")
    async def image(self, image_id: str) -> Response:
        searcher = self.current
        row = searcher.index.row_of.get(image_id)
        if row is None:
            return _error(404, f"no gallery image {image_id!r}")
        data, mime = await run_in_threadpool(searcher.index.image, row)
        return Response(data, media_type=mime, headers={"Cache-Control": "max-age=3600"})

    @api.get("/status")
    def status(self) -> dict[str, Any]:
        index = self.current.index
        return {"alias": self.alias, "registry": self.registry, "version": self.current.version,
                "index": index.url, "count": len(index), "swaps": self.swaps,
                "pending": self.pending, "search": self.current.method, "batch": self.batch,
                "largest_batch": self.largest_batch,
                "mean_batch": round(self.batched / max(1, self.batches), 2)}

    @api.get("/")
    def page(self) -> HTMLResponse:
        return HTMLResponse(render_page(self.current, self.alias))


def build_app(registry: str, alias: str = "champion", *, poll_s: float = 10.0,
              num_replicas: int | str = 1, num_cpus: float = 1.0,
              autoscaling: dict | None = None, settings: dict | None = None):
    """The bound application (`serve.run(build_app(...))`). `num_replicas="auto"` or an
    `autoscaling` dict hands the replica count to Ray Serve's autoscaler; `settings`: how each
    replica searches (`SEARCH_SETTINGS`)."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus}}
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    return SearchService.options(**options).bind(registry, alias, poll_s,
                                                 search_settings(settings))


def app_builder(args: dict[str, str]):
    """For Serve config files: `import_path: composeae.serve.app:app_builder` with
    `args: {registry: URL, alias: champion, poll_s: 10}` and any of `SEARCH_SETTINGS`
    (`shards: 4`, `probe: 64`, `batch: 32`, ...); replicas and autoscaling go under the
    config's `deployments: [{name: SearchService, ...}]`."""
    settings = {key: value for key, value in args.items()
                if key not in ("registry", "alias", "poll_s")}
    return SearchService.bind(args["registry"], args.get("alias", "champion"),
                              float(args.get("poll_s", 10)), search_settings(settings))
