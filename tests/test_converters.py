"""Dataset converters: each runs on a tiny fixture in its dataset's published layout, and the
shards it writes are read back and checked against the original pairing and hit rules."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import fixtures_datasets as fx
from composeae.data import schema, sources
from composeae.data.sources import mitstates
from composeae.data.shardset import read_manifest
from composeae.errors import UserError


# --- helpers -----------------------------------------------------------------------------------

def run(name: str, src: Path, out: Path, **options) -> dict:
    return sources.convert(name, src, str(out), **options)


def read_kind(out: Path, split: str, kind: str) -> list[dict]:
    """Samples of one split/kind, json decoded into "meta", images decoded to check they open."""
    shards = read_manifest(str(out))["splits"][split][kind]["shards"]
    urls = [str(out / s["name"]) for s in shards]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sample = dict(sample)
        sample["meta"] = json.loads(sample.pop(schema.META))
        for key, value in sample.items():
            if key.split(".")[-1] in schema.IMAGE_EXTS:
                Image.open(io.BytesIO(value)).load()
        samples.append(sample)
    return samples


def metas(out: Path, split: str, kind: str) -> list[dict]:
    return [s["meta"] for s in read_kind(out, split, kind)]


def counts(manifest: dict) -> dict:
    return {split: {kind: entry["count"] for kind, entry in kinds.items()}
            for split, kinds in manifest["splits"].items()}


def hits(query: dict, gallery: list[dict]) -> list[str]:
    """The schema's hit rule: same group, same label, the query's reference excluded."""
    return [g["image_id"] for g in gallery
            if g["group"] == query["group"] and g["label"] == query["target_label"]
            and g["image_id"] != query["reference_id"]]


# --- registry ----------------------------------------------------------------------------------

def test_all_five_converters_are_registered():
    assert sources.list_converters() == ["cirr", "css3d", "fashion200k", "fashioniq", "mitstates"]


def test_unknown_converter_lists_the_known_ones(tmp_path):
    known = "cirr, css3d, fashion200k, fashioniq, mitstates"
    with pytest.raises(UserError, match=rf"unknown dataset 'coco'.*{known}"):
        run("coco", tmp_path, tmp_path / "out")


def test_missing_source_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run("cirr", tmp_path / "nowhere", tmp_path / "out")


def test_unknown_option_names_the_accepted_ones(tmp_path):
    with pytest.raises(UserError, match=r"no option targets_per_reference.*shard_size, seed"):
        run("mitstates", tmp_path, tmp_path / "out", targets_per_reference=3)


# --- Fashion200k -------------------------------------------------------------------------------

def test_fashion200k(tmp_path):
    out = tmp_path / "out"
    manifest = run("fashion200k", fx.make_fashion200k(tmp_path / "src"), out, shard_size=2)
    # Train: one group per parent caption that pairs somebody: "floral dress" (red/blue/green),
    # "leather jacket" (black/brown) and "red dress" (floral/striped). The two top captions
    # share parents but no differing word, so their groups pair nobody and are left out.
    assert counts(manifest) == {"train": {"groups": 3}, "test": {"queries": 3, "gallery": 4}}
    params = manifest["params"]
    assert params["hits"] == "caption" and params[schema.EXCLUDE_REFERENCE] is True
    assert params["modifiable_train_images"] == 7 and params["stored_train_images"] == 8
    assert params[schema.PAIRING] == {"rule": "fashion200k", "references": 7, "pairs_per_epoch": 7}
    assert params["categories"] == {"train": list(fx.F200K_TRAIN), "test": list(fx.F200K_TEST)}

    groups = {g["key"]: g for g in metas(out, "train", "groups")}
    assert sorted(groups) == ["floral dress", "leather jacket", "red dress"]
    floral = groups["floral dress"]
    assert floral["captions"] == ["blue floral dress", "green floral dress", "red floral dress"]
    assert [floral["captions"][c] for c in floral["caption_of"]] == [
        "blue floral dress", "blue floral dress", "green floral dress", "red floral dress"]
    # Red floral dress has two usable parents (floral dress, red dress): slot 0 of 2 here and
    # slot 1 of 2 in "red dress"; blue and green have only this one.
    assert floral["slots"] == [[0, 1], [0, 1], [0, 2]]
    red = groups["red dress"]
    assert red["slots"][red["captions"].index("red floral dress")] == [1, 2]
    assert "replace black with brown" in groups["leather jacket"]["texts"]

    queries = metas(out, "test", "queries")
    gallery = metas(out, "test", "gallery")
    assert queries[0]["modifier"] == "replace red with blue"
    assert queries[0]["target_label"] == queries[0]["complete"] == "blue maxi dress"
    assert queries[1]["modifier"] == "replace blue with green"
    assert queries[2]["modifier"] == "replace dress with dress"
    # Caption-level hits: both "blue maxi dress" images answer the first query.
    assert hits(queries[0], gallery) == ["women/dresses/t/11/11_0.jpeg", "women/dresses/t/12/12_0.jpeg"]
    assert hits(queries[1], gallery) == ["women/jackets/t/13/13_0.jpeg"]
    # The third query's reference has the target caption too, but is excluded.
    assert hits(queries[2], gallery) == ["women/dresses/t/11/11_0.jpeg"]


def test_fashion200k_caption_post_processing_and_image_formats(tmp_path):
    out = tmp_path / "out"
    run("fashion200k", fx.make_fashion200k(tmp_path / "src"), out)
    corpus = (out / schema.CORPUS).read_text()
    assert "replace red with blue" in corpus
    gallery = read_kind(out, "test", "gallery")
    by_id = {g["meta"]["image_id"]: g for g in gallery}
    # The .jpeg files are stored as jpg; the BMP behind a .jpeg name was re-encoded.
    assert all("img.jpg" in g for g in gallery)
    assert Image.open(io.BytesIO(by_id[fx.F200K_BMP_IMAGE]["img.jpg"])).format == "JPEG"
    from composeae.data.sources.fashion200k import post_process
    assert post_process(" long gown. v-neck & more?* \n") \
        == "long gowndotmark v-neck andmark morequestionmarkstarmark"


def test_fashion200k_malformed_label_line_names_file_and_line(tmp_path):
    src = fx.make_fashion200k(tmp_path / "src")
    labels = src / "labels" / "jacket_train_detect_all.txt"
    labels.write_text(labels.read_text() + "women/jackets/x/9/9_0.jpeg 0.5 no tabs here\n")
    with pytest.raises(UserError, match=r"jacket_train_detect_all\.txt:3: expected 3 tab-separated"):
        run("fashion200k", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fashion200k_query_with_unknown_image_names_line(tmp_path):
    src = fx.make_fashion200k(tmp_path / "src")
    (src / "test_queries.txt").write_text("women/dresses/t/10/10_0.jpeg women/dresses/t/11/11_0.jpeg\n"
                                          "women/dresses/t/10/10_0.jpeg women/nowhere.jpeg\n")
    with pytest.raises(UserError, match=r"test_queries\.txt:2: image women/nowhere\.jpeg is not in"):
        run("fashion200k", src, tmp_path / "out")


def test_fashion200k_reads_the_categories_it_finds(tmp_path, caplog):
    src = fx.make_fashion200k(tmp_path / "src")
    for category in ("pants", "skirt"):
        for split in ("train", "test"):
            (src / "labels" / f"{category}_{split}_detect_all.txt").unlink()
    (src / "labels" / "top_test_detect_all.txt").unlink()
    with caplog.at_level(logging.INFO, logger="composeae.data.sources"):
        manifest = run("fashion200k", src, tmp_path / "out")
    assert manifest["params"]["categories"] == {"train": ["dress", "jacket", "top"],
                                                "test": ["dress", "jacket"]}
    assert "train categories dress, jacket, top; test categories dress, jacket" in caplog.text


def test_fashion200k_without_any_label_file_of_a_split(tmp_path):
    src = fx.make_fashion200k(tmp_path / "src")
    for path in (src / "labels").glob("*_test_detect_all.txt"):
        path.unlink()
    with pytest.raises(UserError, match=r"no Fashion200k test label file in .*labels"):
        run("fashion200k", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- MIT-States --------------------------------------------------------------------------------

def test_mitstates(tmp_path):
    out = tmp_path / "out"
    manifest = run("mitstates", fx.make_mitstates(tmp_path / "src"), out)
    # Train: one group, the noun apple (green, red x2, rotten): 4 references, 2 pairs each.
    # Test: fish images x 1 other adjective (3) and glass images x 1 (2). The "adj apple" and
    # "misc" folders are not used.
    assert counts(manifest) == {"train": {"groups": 1}, "test": {"queries": 5, "gallery": 5}}
    assert manifest["params"][schema.PAIRING] == {"rule": "mitstates", "references": 4,
                                                  "pairs_per_epoch": 8}
    assert len(mitstates.TEST_NOUNS) == 49

    [apple] = metas(out, "train", "groups")
    assert apple["key"] == "apple" and apple["rule"] == "mitstates"
    assert apple["captions"] == ["green apple", "red apple", "rotten apple"]
    assert apple["image_ids"] == ["green apple/apple_3.jpg", "red apple/apple_1.jpg",
                                  "red apple/apple_2.jpg", "rotten apple/apple_4.jpg"]
    assert apple["caption_of"] == [0, 1, 1, 2] and apple["slots"] == []
    corpus = (out / schema.CORPUS).read_text().splitlines()
    assert {"red", "rotten apple"} <= set(corpus)

    queries = metas(out, "test", "queries")
    gallery = metas(out, "test", "gallery")
    assert {g["image_id"].split()[1].split("/")[0] for g in gallery} == {"fish", "glass"}
    old_fish = [q for q in queries if q["reference_id"] == "old fish/fish_1.jpg"]
    assert [(q["modifier"], q["target_label"]) for q in old_fish] == [("fresh", "fresh fish")]
    assert hits(old_fish[0], gallery) == ["fresh fish/fish_2.jpg", "fresh fish/fish_3.jpg"]


def test_training_samples_are_written_in_seeded_shuffled_order(tmp_path):
    """Annotation order is one category after another; the shards must not be."""
    src = fx.make_fashioniq(tmp_path / "src",
                            *fx.fashioniq_layout(12, {"dress": [("dress-a", "dress-b")]}))
    orders = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run("fashioniq", src, tmp_path / name, seed=seed, shard_size=12)
        orders[name] = [t["group"] + t["modifier"] for t in metas(tmp_path / name, "train", "triplets")]
    assert orders["a"] == orders["b"] != orders["c"]
    assert sorted(orders["a"]) == sorted(orders["c"])
    first_shard = {t.split("Is")[0] for t in orders["a"][:12]}
    assert first_shard == {"dress", "shirt", "toptee"}


def test_mitstates_bad_directory_name(tmp_path):
    src = fx.make_mitstates(tmp_path / "src")
    fx.save_image(src / "images" / "very old fish" / "f.jpg", 1)
    with pytest.raises(UserError, match="not '<adj> <noun>'.*very old fish"):
        run("mitstates", src, tmp_path / "out")


# --- FashionIQ ---------------------------------------------------------------------------------

def test_fashioniq(tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="composeae.data.sources"):
        manifest = run("fashioniq", fx.make_fashioniq(tmp_path / "src"), out)
    # d1->d4 (train) and t1->t9 (val) lose an image: counted skips, not errors.
    assert counts(manifest) == {"train": {"triplets": 3}, "val": {"queries": 3, "gallery": 10}}
    params = manifest["params"]
    assert params["missing_images"] == 2
    assert params["skipped"] == {"train triplets": 1, "val queries": 1, "val gallery images": 0}
    assert "skipped 2 items" in caplog.text
    # FashionIQ's protocols keep the reference in the ranking; the joint gallery is offered.
    assert params[schema.EXCLUDE_REFERENCE] is False and params[schema.JOINT_GALLERY] is True

    dress = next(t for t in metas(out, "train", "triplets") if t["group"] == "dress")
    assert (dress["reference_id"], dress["target_id"], dress["target_label"]) == ("d1", "d2", "d2")
    assert dress["modifier"] == "Is red and has short sleeves"
    assert dress["complete"] == "dress is red. and it has short sleeves"

    gallery = metas(out, "val", "gallery")
    groups = {}
    for g in gallery:
        assert g["label"] == g["image_id"]
        groups.setdefault(g["group"], set()).add(g["image_id"])
    assert groups == {"dress": {"d1", "d2", "d3"}, "shirt": {"s1", "s2", "s3", "d1"},
                      "toptee": {"t1", "t2", "t3"}}
    queries = metas(out, "val", "queries")
    assert [(q["group"], q["reference_id"], q["target_label"]) for q in queries] == [
        ("dress", "d3", "d1"), ("shirt", "s1", "s3"), ("toptee", "t3", "t2")]
    # Id-level hits within the category: d1 is also in the shirt gallery but only dress counts.
    assert [hits(q, gallery) for q in queries] == [["d1"], ["s3"], ["t2"]]
    s3 = next(s for s in read_kind(out, "val", "gallery") if s["meta"]["image_id"] == "s3")
    assert "img.png" in s3


def test_fashioniq_malformed_caption_entry(tmp_path):
    src = fx.make_fashioniq(tmp_path / "src")
    fx.write_json(src / "captions" / "cap.shirt.train.json",
                  [{"candidate": "s1", "target": "s2", "captions": ["a"]},
                   {"candidate": "s1", "captions": ["b"]}])
    with pytest.raises(UserError, match=r"cap\.shirt\.train\.json: entry 1: missing field 'target'"):
        run("fashioniq", src, tmp_path / "out")


def test_fashioniq_invalid_json_names_line(tmp_path):
    src = fx.make_fashioniq(tmp_path / "src")
    (src / "image_splits" / "split.toptee.val.json").write_text('[\n"t1",\n"t2"\n"t3"]')
    with pytest.raises(UserError, match=r"split\.toptee\.val\.json:4: invalid JSON"):
        run("fashioniq", src, tmp_path / "out")


# --- CIRR --------------------------------------------------------------------------------------

@pytest.mark.parametrize("images_under", ["", "cirr/img_raw"])
def test_cirr(tmp_path, images_under):
    out = tmp_path / "out"
    manifest = run("cirr", fx.make_cirr(tmp_path / "src", images_under), out)
    # test1 has no targets and is not converted.
    assert counts(manifest) == {"train": {"triplets": 2}, "val": {"queries": 2, "gallery": 4}}
    assert manifest["params"]["image_root"] == (images_under or "dataset root")

    assert manifest["params"][schema.EXCLUDE_REFERENCE] is True
    triplets = metas(out, "train", "triplets")
    assert sorted((t["reference_id"], t["target_id"], t["modifier"], t["target_label"])
                  for t in triplets) == [
        ("train-1-0-img0", "train-1-0-img1", "add a dog", "train-1-0-img1"),
        ("train-2-1-img0", "train-1-0-img0", "make it night", "train-1-0-img0")]

    queries = metas(out, "val", "queries")
    gallery = metas(out, "val", "gallery")
    assert [(q["query_id"], q["target_label"], q["target_id"]) for q in queries] == [
        ("100", "dev-2-1-img0", "dev-2-1-img0"), ("101", "dev-1-0-img1", "dev-1-0-img1")]
    ids = [g["image_id"] for g in gallery]
    assert sorted(ids) == sorted(fx.CIRR_SPLITS["val"])
    for q in queries:
        # The reference is in the gallery (it is another query's candidate) and only the
        # exclusion rule removes it: the target is the one hit.
        assert q["reference_id"] in ids
        assert hits(q, gallery) == [q["target_label"]]
        # img_set members travel with the query for Recall_subset@K.
        assert q["reference_id"] in q["subset"] and q["target_id"] in q["subset"]
        assert set(q["subset"]) <= set(ids)


def test_cirr_caption_naming_an_unknown_image(tmp_path):
    src = fx.make_cirr(tmp_path / "src")
    path = src / "cirr" / "captions" / "cap.rc2.val.json"
    pairs = json.loads(path.read_text())
    pairs[1]["target_hard"] = "dev-9-9-img9"
    fx.write_json(path, pairs)
    with pytest.raises(UserError, match=r"cap\.rc2\.val\.json: entry 1 \(pairid 101\): target_hard "
                                        r"'dev-9-9-img9' is not in split\.rc2\.val\.json"):
        run("cirr", src, tmp_path / "out")


def test_cirr_missing_image_names_its_path(tmp_path):
    src = fx.make_cirr(tmp_path / "src")
    (src / "dev" / "dev-3-0-img1.png").unlink()
    with pytest.raises(UserError, match=r"missing image: .*dev-3-0-img1\.png"):
        run("cirr", src, tmp_path / "out")
    assert not (tmp_path / "out" / schema.MANIFEST).exists()


# --- CSS3D -------------------------------------------------------------------------------------

def test_css3d(tmp_path):
    out = tmp_path / "out"
    manifest = run("css3d", fx.make_css3d(tmp_path / "src"), out)
    assert counts(manifest) == {"train": {"triplets": 3}, "test": {"queries": 3, "gallery": 4}}
    assert manifest["params"]["hits"] == "label"

    assert manifest["params"][schema.EXCLUDE_REFERENCE] is True
    triplets = sorted(metas(out, "train", "triplets"), key=lambda t: (t["modifier"], t["reference_id"]))
    assert [(t["reference_id"], t["target_id"], t["modifier"]) for t in triplets] == [
        ("css_train_000000", "css_train_000001", "add blue sphere"),
        ("css_train_000002", "css_train_000001", "add blue sphere"),
        ("css_train_000001", "css_train_000002", "remove red cube")]
    # Both "add blue sphere" pairs end in the same scene, so they share a target label.
    assert triplets[0]["target_label"] == triplets[1]["target_label"] != triplets[2]["target_label"]

    gallery = metas(out, "test", "gallery")
    labels = [g["label"] for g in gallery]
    assert labels[0] == labels[2] and len(set(labels)) == 3   # identical scenes share a label
    queries = metas(out, "test", "queries")
    assert hits(queries[0], gallery) == ["css_test_000000", "css_test_000002"]
    # Query from scene 0 to scene 1: scene 1 is the hit; the reference itself never is.
    assert queries[1]["reference_id"] == "css_test_000000"
    assert hits(queries[1], gallery) == ["css_test_000001"]


def test_css3d_to_s3(tmp_path, s3_bucket):
    url = f"{s3_bucket}/css3d"
    manifest = sources.convert("css3d", fx.make_css3d(tmp_path / "src"), url, shard_size=2)
    assert read_manifest(url)["splits"] == manifest["splits"]
    assert [s["count"] for s in manifest["splits"]["test"]["gallery"]["shards"]] == [2, 2]


def test_css3d_uses_the_files_labels_when_present(tmp_path):
    data = {split: dict(fx.CSS_DATA[split]) for split in ("train", "test")}
    data["test"]["labels"] = np.array([5, 6, 7, 5])
    out = tmp_path / "out"
    manifest = run("css3d", fx.make_css3d(tmp_path / "src", data), out)
    assert manifest["params"]["labels"] == "from the file's 'labels'"
    assert [g["label"] for g in metas(out, "test", "gallery")] == ["5", "6", "7", "5"]


def test_css3d_modification_out_of_range(tmp_path):
    data = {split: dict(fx.CSS_DATA[split]) for split in ("train", "test")}
    data["train"]["mods"] = [{"from": [0], "to": [9], "to_str": "add"}]
    with pytest.raises(UserError, match=r"dup\.npy: train mods\[0\]: image id 9 out of range 0\.\.3"):
        run("css3d", fx.make_css3d(tmp_path / "src", data), tmp_path / "out")


def test_css3d_unreadable_image_names_its_path(tmp_path):
    src = fx.make_css3d(tmp_path / "src")
    (src / "images" / "css_test_000003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match=r"unreadable image .*css_test_000003\.png"):
        run("css3d", src, tmp_path / "out")
    assert not (tmp_path / "out" / schema.MANIFEST).exists()
