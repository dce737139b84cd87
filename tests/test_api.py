"""`composeae.load`: a checkpoint's model embeds pictures and queries as the evaluation does."""

from __future__ import annotations

import functools
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import composeae
from composeae.data import schema
from composeae.data.shardset import read_manifest
from composeae.data.stream import eval_batches
from composeae.errors import UserError
from composeae.evaluate import embed
from composeae.testing.checkpoints import random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(css_tiny, tmp_path_factory):
    return random_checkpoint(css_tiny, tmp_path_factory.mktemp("ckpt"), seed=3)


def _first_samples(data_url: str, kind: str, count: int) -> list[dict[str, bytes]]:
    """The first `count` samples of the test split's first `kind` shard, as raw files."""
    name = read_manifest(data_url)["splits"]["test"][kind]["shards"][0]["name"]
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(f"{data_url}/{name}") as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
            if len(samples) > count:
                break
    return list(samples.values())[:count]


def test_load_embeds_gallery_images_and_queries_as_the_evaluation_does(css_tiny, checkpoint):
    model = composeae.load(checkpoint)
    assert model.config.data.url == css_tiny

    # The evaluation's own embeddings of the first gallery images and queries.
    batches = functools.partial(eval_batches, model.config.data, "test", batch_size=4,
                                rank=0, world_size=1)
    gallery = embed(model.module, batches(schema.GALLERY), "image", None, ("image_id",),
                    torch.device("cpu"), "fp32")
    queries = embed(model.module, batches(schema.QUERIES), "reference", "modifier",
                    ("query_id",), torch.device("cpu"), "fp32")
    unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)

    pictures = [next(v for k, v in s.items() if k != "json")
                for s in _first_samples(css_tiny, "gallery", 3)]
    mine = model.embed_images([pictures[0], Image.open(io.BytesIO(pictures[1])), pictures[2]])
    assert mine.shape == (3, model.config.model.embed_dim) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, unit(gallery["emb"][:3]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-5)

    samples = _first_samples(css_tiny, "queries", 2)
    refs = [next(v for k, v in s.items() if k != "json") for s in samples]
    texts = [json.loads(s["json"])["modifier"] for s in samples]
    np.testing.assert_allclose(model.embed_queries(refs, texts), unit(queries["emb"][:2]),
                               atol=1e-5)
    # The text changes the query; the text features are the encoder's.
    other = model.embed_queries(refs[:1], ["remove every object"])
    assert not np.allclose(other[0], model.embed_queries(refs[:1], texts[:1])[0])
    assert model.embed_texts(texts).shape == (2, model.config.model.text_dim)


def test_load_refuses_unreadable_pictures_and_mismatched_texts(checkpoint, tmp_path):
    model = composeae.load(checkpoint)
    with pytest.raises(UserError, match="cannot be read"):
        model.embed_images([b"not an image"])
    with pytest.raises(UserError, match="cannot be read"):
        model.embed_images([tmp_path / "missing.png"])
    picture = Image.new("RGB", (40, 30), "red")
    with pytest.raises(UserError, match="one text per reference"):
        model.embed_queries([picture, picture], ["one text"])
    assert model.embed_images([]).shape == (0, model.config.model.embed_dim)
