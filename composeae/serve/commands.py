"""The `composeae index | search | serve` commands.

    composeae index  --checkpoint URL | --registry URL [--alias champion]  --data URL
                     [--split test] [--out URL] [--dtype float16] [--workers N]
    composeae search --index URL  --image PATH | --ref GALLERY_ID  --text "..." [--k 10]
                     [--html OUT]
    composeae serve  --registry URL [--alias champion] [--port 8000] [--poll 10]

`register(subparsers)` adds them to the top-level parser. Bad input ends in one line (`UserError`).
"""

from __future__ import annotations

import argparse

from composeae import storage
from composeae.config import Config
from composeae.errors import UserError
from composeae.registry.store import ModelRegistry
from composeae.run.cluster import init_ray
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
                   help="most embedding actors at once (default: the checkpoint's ray.num_workers)")
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
    p.set_defaults(func=run_search)

    p = subparsers.add_parser("serve", help="serve a registry alias's model and index over HTTP "
                                            "(Ray Serve); follows the alias")
    p.add_argument("--registry", required=True, help="model registry (path or s3://)")
    p.add_argument("--alias", default="champion", help="the alias to serve (default champion)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                   help="how often each replica checks the alias (default 10)")
    p.add_argument("--replicas", default="1", help="replicas, or `auto` for Ray Serve's "
                                                   "autoscaling (default 1)")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--detach", action="store_true",
                   help="return once deployed (on a cluster joined through RAY_ADDRESS)")
    p.set_defaults(func=run_serve)


def run_index(args: argparse.Namespace) -> None:
    from composeae.run.eval_job import checkpoint_test_split
    from composeae.serve.index import build_index, registry_index_url, resolve_model

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
                       workers=args.workers)
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
    index = load_index(args.index)
    k = check_k(args.k, len(index))
    searcher = Searcher.load(index)
    result = searcher.search(text, k, ref=args.ref, image=image)
    version = result["version"]
    print(f"top {k} of {len(index)} for {args.ref or args.image} + {text!r} "
          f"(model {'version ' + str(version) if version is not None else 'checkpoint'}):")
    for rank, item in enumerate(result["results"], 1):
        print(f"{rank:>4}  {item['score']:.4f}  {item['id']}")
    if args.html:
        reference = (index.image(index.row(args.ref)) if args.ref is not None
                     else (image, "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"))
        storage.write_text(args.html, render_page(searcher, result, reference))
        print(f"page: {args.html}")


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
    init_ray(Config())
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(registry.url, args.alias, poll_s=args.poll,
                        num_replicas=replicas if replicas == "auto" else int(replicas),
                        num_cpus=args.cpus), name="composeae", route_prefix="/")
    print(f"serving {args.alias} (version {version}) of {registry.url} at "
          f"http://{args.host}:{args.port}/ (POST /search, GET /image/ID, GET /status)",
          flush=True)
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
