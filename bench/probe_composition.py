"""How much of a trained model's query comes from the modifier text, and how much from the image.

For each checkpoint, on test-split triplets of its dataset (reference, modifier, target):

    q        = compose(reference_i, modifier_i)          the query as trained
    q_text   = compose(reference_i, modifier_perm(i))     the same image, another query's text
    q_image  = compose(reference_perm(i), modifier_i)     the same text, another query's image

all L2-normalised. `text share` = E|q - q_text|^2 / (E|q - q_text|^2 + E|q - q_image|^2): 0 when
the query ignores the text, 1 when it ignores the image. On CSS-synth a target differs from its
reference by one object, so a good query keeps most of the image and still moves with the text;
`edit alignment` = cos(q - r, t - r), with r and t the reference's and target's embeddings, and
`cos(q, target)` against `cos(q, reference)` show whether it moved the right way. For ComposeAE
checkpoints it also prints the rotation's median angle |delta| (radians) and median |x~| (the
magnitude that scales every text-carried phase).

    python bench/probe_composition.py CHECKPOINT [CHECKPOINT ...] [--batches 8]

A sweep directory (one with the `best.json` that `composeae tune` writes) stands for its best
trial's checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe(url: str, batches: int) -> dict[str, float]:
    from composeae.checkpoint import load_checkpoint
    from composeae.run.build import model_from_checkpoint
    from composeae.data.stream import eval_batches
    from composeae.models.composeae import ComposeAE

    best = Path(url, "best.json")
    if best.exists():
        url = json.loads(best.read_text())["best_checkpoint"]
    model, cfg = model_from_checkpoint(load_checkpoint(url))
    queries = list(zip(range(batches), eval_batches(cfg.data, "test", "queries", 64, rank=0,
                                                    world_size=1)))
    # Only the probed queries' targets: a `full` gallery decoded whole would be gigabytes.
    wanted = {t for _, batch in queries for t in batch["target_id"]}
    gallery = {}
    for batch in eval_batches(cfg.data, "test", "gallery", 256, rank=0, world_size=1):
        gallery.update((i, image) for i, image in zip(batch["image_id"], batch["image"])
                       if i in wanted)
    stats: dict[str, list[torch.Tensor]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        stats.setdefault(name, []).append(value.detach().flatten())

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, batch in queries:
            image, texts = batch["reference"], list(batch[cfg.data.text_mode])
            perm = torch.randperm(len(texts), generator=g)
            q = F.normalize(model.compose(image, texts), dim=-1)
            q_text = F.normalize(model.compose(image, [texts[i] for i in perm]), dim=-1)
            q_image = F.normalize(model.compose(image[perm], texts), dim=-1)
            target = torch.stack([gallery[t] for t in batch["target_id"]])
            t = F.normalize(model.embed_target(target), dim=-1)
            r = F.normalize(model.embed_target(image), dim=-1)
            add("text_move", (q - q_text).pow(2).sum(-1))
            add("image_move", (q - q_image).pow(2).sum(-1))
            add("cos_target", (q * t).sum(-1))
            add("cos_reference", (q * r).sum(-1))
            add("cos_reference_target", (r * t).sum(-1))
            # Does the query leave the reference in the edit's direction?
            add("edit_alignment", F.cosine_similarity(q - r, t - r, dim=-1))
            if isinstance(model, ComposeAE):
                x = model.image_encoder(image)
                x_tilde, delta = model.projection(x, model.encode_text(texts))
                add("abs_delta", delta.abs())
                add("abs_x_tilde", x_tilde.abs())
    flat = {k: torch.cat(v) for k, v in stats.items()}
    text, image = flat["text_move"].mean().item(), flat["image_move"].mean().item()
    out = {"checkpoint": url, "model": cfg.model.name, "text_share": text / (text + image),
           "text_move": text, "image_move": image,
           **{k: flat[k].mean().item() for k in ("edit_alignment", "cos_target", "cos_reference",
                                                  "cos_reference_target")}}
    if "abs_delta" in flat:
        out.update({"median_abs_delta": flat["abs_delta"].median().item(),
                    "median_abs_x_tilde": flat["abs_x_tilde"].median().item()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--batches", type=int, default=8, help="batches of 64 test queries")
    args = parser.parse_args()
    rows = [probe(url, args.batches) for url in args.checkpoints]
    keys = ["text_share", "edit_alignment", "cos_target", "cos_reference", "cos_reference_target"]
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['model']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
