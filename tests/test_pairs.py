"""Training pairs in the stream, on converted fixtures in each dataset's published layout:
pairs drawn at every pass follow the original rules, are deterministic per seed and rank, and
batches mix the dataset instead of reading one slice of it."""

from __future__ import annotations

from collections import Counter

import pytest

import fixtures_datasets as fx
from composeae.config import DataConfig
from composeae.data import sources
from composeae.data.pairing import different_words, replace_text
from composeae.data.sources.fashion200k import post_process
from composeae.data.stream import TrainStream


def stream(url: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
           **data) -> TrainStream:
    config = DataConfig(url=url, image_size=8, loader_workers=0, **data)
    return TrainStream(config, batch_size, rank=rank, world_size=world_size, seed=seed)


def pairs(batches) -> list[tuple[str, str]]:
    return [p for b in batches for p in zip(b["reference_id"], b["target_id"])]


def one_word_apart(a: str, b: str) -> bool:
    """Siblings: removing one word from each caption leaves the same parent."""
    parents = lambda c: {" ".join(c.split()[:i] + c.split()[i + 1:]) for i in range(len(c.split()))}
    return a != b and bool(parents(a) & parents(b))


@pytest.fixture(scope="module")
def f200k(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("f200k")
    sources.convert("fashion200k", fx.make_fashion200k(root / "src"), str(root / "out"),
                    shard_size=1)
    return str(root / "out")


@pytest.fixture(scope="module")
def mit(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mit")
    sources.convert("mitstates", fx.make_mitstates(root / "src", fx.MIT_MANY_NOUNS),
                    str(root / "out"), shard_size=2)
    return str(root / "out")


def test_fashion200k_pairs_are_sibling_captions_drawn_afresh_every_pass(f200k):
    caption = {path: post_process(text) for table in fx.F200K_TRAIN.values()
               for path, text in table}
    modifiable = [p for p, c in caption.items() if "floral" in c or "leather" in c or "striped" in c]
    # One group open at a time: a pass over the groups is exactly the epoch's 7 pairs.
    train = stream(f200k, 1, open_groups=1)
    assert train.steps_per_epoch == 7
    targets_of_red = set()
    for epoch in range(6):
        batches = list(train.epoch(epoch))
        # Every modifiable image is a reference exactly once per pass.
        assert sorted(b["reference_id"][0] for b in batches) == sorted(modifiable)
        for b in batches:
            source, target = caption[b["reference_id"][0]], caption[b["target_id"][0]]
            assert one_word_apart(source, target), (source, target)
            assert b["modifier"] == [replace_text(*different_words(source, target))]
            assert b["complete"] == b["target_label"] == [target]
            if source == "red floral dress":
                targets_of_red.add(target)
    # Through both of its parents (floral dress, red dress): not one fixed target.
    assert len(targets_of_red) >= 2 and "red striped dress" in targets_of_red


def test_pairs_are_deterministic_per_seed_and_rank_and_fixed_on_request(f200k):
    def run(rank: int, seed: int = 0, epochs=(0, 1), **data) -> list[list[tuple[str, str]]]:
        s = stream(f200k, 2, rank=rank, world_size=2, seed=seed, **data)
        return [pairs(s.epoch(e)) for e in epochs]

    first, again = run(rank=1), run(rank=1)
    assert first == again
    assert len(first[0]) == len(run(rank=0)[0])  # equal batch counts on both ranks
    per_step = [set(p) for p in run(rank=0, epochs=range(4))]
    assert len({frozenset(p) for p in per_step}) > 1  # new draws in later epochs
    fixed = stream(f200k, 1, pairs="fixed", open_groups=1)
    assert set(pairs(fixed.epoch(0))) == set(pairs(fixed.epoch(1))) == set(pairs(fixed.epoch(5)))
    other_seed = stream(f200k, 1, pairs="fixed", open_groups=1, seed=1)
    assert set(pairs(other_seed.epoch(0))) != set(pairs(fixed.epoch(0)))


def test_mitstates_pairs_keep_the_noun_change_the_adjective_and_travel_in_twos(mit):
    train = stream(mit, 8, open_groups=1)
    assert train.steps_per_epoch == 12  # 8 nouns x 3 adjectives x 2 images, 2 pairs each
    for epoch in (0, 1):
        batches = list(train.epoch(epoch))
        for b in batches:
            for i in range(0, 8, 2):
                # A reference's two pairs are neighbours in one batch, to different adjectives.
                assert b["reference_id"][i] == b["reference_id"][i + 1]
                assert b["modifier"][i] != b["modifier"][i + 1]
            for ref, tgt, modifier, complete in zip(b["reference_id"], b["target_id"],
                                                    b["modifier"], b["complete"]):
                ref_adj, ref_noun = ref.split("/")[0].split()
                tgt_adj, tgt_noun = tgt.split("/")[0].split()
                assert tgt_noun == ref_noun and tgt_adj != ref_adj
                assert modifier == tgt_adj and complete == f"{tgt_adj} {tgt_noun}"
        # Each of the 48 images is a reference once per pass (twice in the pairs).
        assert Counter(Counter(r for b in batches for r in b["reference_id"]).values()) == {2: 48}


def nouns(batch: dict) -> set[str]:
    return {r.split("/")[0].split()[1] for r in batch["reference_id"]}


def test_mitstates_batches_mix_nouns(mit):
    first = [next(iter(stream(mit, 8, seed=seed).epoch(0))) for seed in range(3)]
    assert all(len(nouns(b)) >= 3 for b in first)
    # One group open at a time reads the nouns one after another: what mixing prevents.
    narrow = next(iter(stream(mit, 8, open_groups=1).epoch(0)))
    assert len(nouns(narrow)) == 1


def test_fashioniq_batches_mix_categories(tmp_path):
    layout = fx.fashioniq_layout(12, {"dress": [("dress-a", "dress-b")]})
    src = fx.make_fashioniq(tmp_path / "src", *layout)
    sources.convert("fashioniq", src, str(tmp_path / "out"), shard_size=36)
    # One shard and a two-sample shuffle buffer: the batch is the shard's order.
    first = [b["group"] for b in stream(str(tmp_path / "out"), 8, shuffle_buffer=2).epoch(0)]
    assert all(len(set(groups)) >= 2 for groups in first)
    assert set(sum(first[:2], [])) == {"dress", "shirt", "toptee"}
