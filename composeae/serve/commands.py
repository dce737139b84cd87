"""The `composeae index | search | serve` commands.

    composeae index  --checkpoint URL | --registry URL [--alias champion]  --data URL
                     [--split test] [--out URL] [--dtype float16] [--workers N]
                     [--kind exact|ivf|hnsw [--lists N] [--hnsw-m M] [--codes sq8|flat]]
    composeae search --index URL  --image PATH | --ref GALLERY_ID  --text "..." [--k 10]
                     [--html OUT] [--probe N] [--rerank F] [--exact]
    composeae serve  --registry URL [--alias champion] [--host 127.0.0.1] [--port 8000]
                     [--token-file FILE | --insecure] [--read-timeout-s 20] [--poll-s 10]
                     [--shards N] [--probe N] [--rerank F] [--exact] [--batch N]

`register(subparsers)` adds them to the top-level parser. Bad input ends in one line (`UserError`).
"""

from __future__ import annotations

import argparse

from composeae import storage
from composeae.config import Config
from composeae.errors import UserError
from composeae.registry.store import ModelRegistry
from composeae.run.cluster import init_ray
from composeae.serve.auth import Access, check_bind, digest, read_token_file
from composeae.serve.http_limits import Limits
from composeae.serve.runs import split_blocks
from composeae.storage import absolute_url


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="embed a gallery into a search index")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint file or directory (path or s3://)")
    source.add_argument("--registry", help="model registry (path or s3://); with --alias")
    p.add_argument("--alias", default=None, help="registry alias or version (default champion)")
    p.add_argument("--data", required=True, help="dataset URL whose gallery is indexed")
    p.add_argument("--split", default=None,
                   help="gallery split (default: the checkpoint's eval.test_split)")
    p.add_argument("--out", default=None, help="index URL (default with --registry: the "
                                               "registry's indexes/<version>)")
    p.add_argument("--dtype", default="float16", help="float16 (default) or float32")
    p.add_argument("--workers", type=int, default=None,
                   help="most embedding actors at once, and the Ray tasks filling an ivf index "
                        "(default: the checkpoint's ray.num_workers)")
    p.add_argument("--kind", default="exact",
                   help="exact (default: the blocks alone), or an approximate index built on "
                        "them: ivf (k-means lists) or hnsw (a graph)")
    p.add_argument("--lists", type=int, default=None,
                   help="ivf: k-means lists (default 4 x sqrt(rows), a power of two)")
    p.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links per row (default 32)")
    p.add_argument("--codes", default=None,
                   help="ivf/hnsw: how rows are stored in it: sq8 (8-bit, default) or flat")
    p.set_defaults(func=run_index)

    p = subparsers.add_parser("search", help="top-k gallery images of a composed query")
    p.add_argument("--index", required=True, help="index URL (path or s3://)")
    reference = p.add_mutually_exclusive_group(required=True)
    reference.add_argument("--image", help="reference image file")
    reference.add_argument("--ref", help="reference: a gallery image id of the index")
    p.add_argument("--text", required=True, help="the modifier text")
    p.add_argument("--k", default="10", help="results (default 10)")
    p.add_argument("--html", default=None, metavar="OUT.html",
                   help="also write a page with the images (path or s3://)")
    _search_knobs(p)
    p.set_defaults(func=run_search)

    p = subparsers.add_parser("serve", help="serve a registry alias's model and index over HTTP "
                                            "(Ray Serve); follows the alias")
    p.add_argument("--registry", required=True, help="model registry (path or s3://)")
    p.add_argument("--alias", default="champion", help="the alias to serve (default champion)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="a file holding the bearer token every endpoint but /healthz asks for "
                        "(needed to bind anything but loopback)")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback --host without a token, open to anyone")
    # Seconds, named as in a Serve config's args (`read_timeout_s`, `poll_s`); the earlier
    # names are refused in one line (`run_serve`).
    p.add_argument("--read-timeout", "--poll", dest="renamed", action="append",
                   help=argparse.SUPPRESS)
    p.add_argument("--read-timeout-s", type=float, default=Limits().read_timeout_s,
                   metavar="SECONDS",
                   help=f"a request's whole body must arrive within this (default "
                        f"{Limits().read_timeout_s:g})")
    p.add_argument("--poll-s", type=float, default=10.0, metavar="SECONDS",
                   help="how often each replica checks the alias (default 10)")
    p.add_argument("--replicas", default="1", help="replicas, or `auto` for Ray Serve's "
                                                   "autoscaling (default 1)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--shards", type=int, default=1,
                   help="shard actors holding the gallery's rows, 1/N each, searched exactly "
                        "and merged (default 1: the replica holds them)")
    p.add_argument("--shard-cpus", type=float, default=1.0,
                   help="CPUs per shard actor (default 1)")
    _search_knobs(p)
    p.add_argument("--batch", type=int, default=16,
                   help="most concurrent requests answered together: a batch is formed when "
                        "the previous one ends, of those that arrived meanwhile (default 16; "
                        "1: each request alone)")
    p.add_argument("--detach", action="store_true",
                   help="return once deployed (on a cluster joined through RAY_ADDRESS)")
    p.set_defaults(func=run_serve)


def _search_knobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", default=None,
                   help="approximate index: ivf lists visited (nprobe) or hnsw candidate list "
                        "(efSearch); default: the manifest's")
    p.add_argument("--rerank", default=None,
                   help="approximate index: re-score rerank x k candidates on the stored rows "
                        "(0: the index's own scores); default: the manifest's")
    p.add_argument("--exact", action="store_true",
                   help="search exactly even where the index has an approximate one")


def _check_exact(args: argparse.Namespace) -> None:
    if args.exact and (args.probe is not None or args.rerank is not None):
        raise UserError("--exact searches without the approximate index: give no --probe or "
                        "--rerank with it")


def run_index(args: argparse.Namespace) -> None:
    from composeae.run.eval_job import checkpoint_test_split
    from composeae.serve.ann import check_spec
    from composeae.serve.index import build_index, registry_index_url, resolve_model

    ann = check_spec(args.kind, args.lists, args.hnsw_m, args.codes)  # before loading anything
    if args.alias is not None and args.registry is None:
        raise UserError("--alias needs --registry")
    model = resolve_model(args.checkpoint, args.registry, args.alias)
    split = args.split or checkpoint_test_split(model["checkpoint"])
    out = args.out
    if out is None:
        if model["version"] is None:
            raise UserError("index --checkpoint needs --out URL")
        out = registry_index_url(model["registry"], model["version"])
    done = build_index(model, args.data, out, split=split, dtype=args.dtype,
                       workers=args.workers, ann=ann)
    _release_ray()
    m = done.manifest
    what = (f"version {m['model']['version']}" if m["model"].get("version") is not None
            else m["model"]["checkpoint"])
    if not done.built:
        print(f"index at {done.url} is up to date ({what}, gallery fingerprint "
              f"{m['data']['fingerprint'][:12]}): nothing to do")
        return
    resumed = f"; {done.resumed} block(s) kept from an interrupted build" if done.resumed else ""
    print(f"indexed {m['count']} images of {m['data']['url']} [{m['data']['split']}] with "
          f"{what}: dim {m['dim']}, {m['dtype']}, {len(m['blocks'])} blocks{resumed}")
    if "ann" in m:
        print(f"approximate index: {m['ann']['factory']} ({m['ann']['file']}); search "
              f"defaults probe {m['ann']['search']['probe']}, rerank "
              f"{m['ann']['search']['rerank']}")
    print(f"index: {done.url}")


def _release_ray() -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run_search(args: argparse.Namespace) -> None:
    from composeae.serve.index import load_index
    from composeae.serve.search import Searcher, check_k, check_text, render_page

    text = check_text(args.text)  # before loading anything
    image = None
    if args.image is not None:
        try:
            with open(args.image, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise UserError(f"cannot read --image {args.image}: {exc.strerror}") from None
    _check_exact(args)
    index = load_index(args.index, ann=not args.exact)
    k = check_k(args.k, len(index))
    searcher = Searcher.load(index, probe=args.probe, rerank=args.rerank, exact=args.exact)
    result = searcher.search(text, k, ref=args.ref, image=image)
    version = result["version"]
    print(f"top {k} of {len(index)} for {args.ref or args.image} + {text!r} "
          f"(model {'version ' + str(version) if version is not None else 'checkpoint'}, "
          f"{searcher.method}):")
    for rank, item in enumerate(result["results"], 1):
        print(f"{rank:>4}  {item['score']:.4f}  {item['id']}")
    if args.html:
        reference = (index.image(index.row(args.ref)) if args.ref is not None
                     else (image, "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"))
        storage.write_text(args.html, render_page(searcher, result, reference))
        print(f"page: {args.html}")


REQUEST_TIMEOUT_S = 120.0
"""Ray Serve's end-to-end limit on one HTTP request (408 after it)."""


def run_serve(args: argparse.Namespace) -> None:
    import signal
    import sys
    import time

    try:
        import fastapi  # noqa: F401
        from ray import serve
    except ImportError:
        raise UserError("composeae serve needs Ray Serve: pip install -c constraints.txt "
                        "'.[serve]'") from None

    from composeae.serve.app import alias_version, build_app
    from composeae.serve.index import read_manifest, registry_index_url

    # Credentials first: a refused bind reads and starts nothing.
    token = read_token_file(args.token_file) if args.token_file is not None else None
    check_bind(args.host, token is not None, args.insecure)
    if args.renamed:
        raise UserError("--read-timeout and --poll are now --read-timeout-s and --poll-s "
                        "(seconds, as read_timeout_s and poll_s in a Serve config)")
    if not args.read_timeout_s > 0:
        raise UserError(f"--read-timeout-s must be more than 0 seconds, got "
                        f"{args.read_timeout_s:g}")
    registry = ModelRegistry.open(absolute_url(args.registry))
    version = alias_version(registry.url, args.alias)
    index_url = registry_index_url(registry.url, version)
    if read_manifest(index_url) is None:
        raise UserError(f"alias {args.alias} (version {version}) has no index at {index_url}; "
                        f"build it with `composeae index --registry {args.registry} --alias "
                        f"{args.alias} --data URL`")
    replicas = args.replicas
    if replicas != "auto" and not (replicas.isdigit() and int(replicas) > 0):
        raise UserError(f"--replicas must be a positive number or auto, got {replicas!r}")
    settings = check_serve_settings(args, read_manifest(index_url))
    init_ray(Config())
    check_shard_cpus(args, replicas)
    # Ray Serve's end-to-end limit backs up the replica's own read timeout.
    serve.start(http_options={"host": args.host, "port": args.port,
                              "request_timeout_s": REQUEST_TIMEOUT_S})
    serve.run(build_app(registry.url, args.alias, poll_s=args.poll_s,
                        num_replicas=replicas if replicas == "auto" else int(replicas),
                        num_cpus=args.cpus, settings=settings,
                        access=Access(None if token is None else digest(token)),
                        limits=Limits(read_timeout_s=args.read_timeout_s)),
              name="composeae", route_prefix="/")
    opened = "" if token is None else " (send Authorization: Bearer TOKEN; the page: /?token=TOKEN)"
    print(f"serving {args.alias} (version {version}) of {registry.url} at "
          f"http://{args.host}:{args.port}/ (POST /search, GET /image/ID, GET /status)"
          f"{opened}", flush=True)
    if token is None:
        print(f"no token: anyone who can reach {args.host}:{args.port} can search it", flush=True)
    if args.detach:
        return
    print("Ctrl-C stops it", flush=True)
    # A container or process manager stops with SIGTERM: shut the application down then too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


def check_serve_settings(args: argparse.Namespace, manifest: dict) -> dict:
    """`serve`'s search settings (`app.SEARCH_SETTINGS`), checked against the index in service
    before anything starts; `UserError` for a bad one."""
    from composeae.serve.ann import check_knobs

    if args.batch < 1:
        raise UserError(f"--batch must be 1 or more, got {args.batch}")
    if args.shards != 1:
        if args.probe is not None or args.rerank is not None:
            raise UserError("--shards searches exactly: --probe and --rerank apply to one "
                            "replica holding an approximate index")
        split_blocks([b["count"] for b in manifest["blocks"]], args.shards)
    elif args.exact:
        _check_exact(args)
    else:
        check_knobs(manifest.get("ann"), args.probe, args.rerank)
    if not args.shard_cpus > 0:
        raise UserError(f"--shard-cpus must be more than 0, got {args.shard_cpus:g}")
    return {"shards": args.shards, "shard_cpus": args.shard_cpus, "probe": args.probe,
            "rerank": args.rerank, "exact": args.exact, "batch": args.batch}


def check_shard_cpus(args: argparse.Namespace, replicas: str) -> None:
    """Sharded replicas fit the Ray they start on, with room for a swap's second set of shard
    actors (they load beside the ones in service); `UserError` otherwise, instead of actors
    waiting for CPUs that never come."""
    import ray

    if args.shards == 1 or replicas == "auto":
        return
    shards = args.shards * args.shard_cpus
    need = int(replicas) * (args.cpus + 2 * shards)
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise UserError(f"{replicas} replica(s) of --cpus {args.cpus:g} with --shards "
                        f"{args.shards} x --shard-cpus {args.shard_cpus:g} need {need:g} CPUs "
                        f"(the shards twice: a promotion loads the next ones beside them); Ray "
                        f"has {have:g}")
