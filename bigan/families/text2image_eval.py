"""What model.arch=dfgan is evaluated with: attribute accuracy (attr), R-precision (rprec) and CLIP score (clip)
on the captioned demo's prompts, and fid/kid of images drawn from the reference set's own captions.

attr, rprec, clip: for each of two groups of prompts, captions of unseen demo scenes (attribute combinations
seen in training) and of held-out scenes (combinations never trained on, bigan.data.captions.HELD_OUT),
n / 2 images are drawn once (prompt i % EVAL_PROMPTS, latents seeded per block, so the samples do not
depend on the ranks) and every wanted scorer reads them; the real renders of the same prompts give each
metric's ceiling. An attribute classifier scores an image on the attributes its prompt names (style, sun or
moon, ridges, water, trees; bigan.data.captions.mentioned):

    attr_acc, attr_acc_held_out            share of named attributes the images show
    attr_all, attr_all_held_out            share of images showing every attribute their prompt names
    attr_acc_real, attr_acc_real_held_out  the same of the real renders of those prompts: the ceiling
                                           (the classifier's own errors: ridges are hard at 32 px)

rprec and clip (rprec_held_out, rprec_real, rprec_real_held_out; clip_...): bigan.families.text2image_metrics.
"""
from __future__ import annotations

import functools

import torch

from bigan.tracking import to_uint8

EVAL_PROMPTS = 32  # distinct prompts per group
CLASSIFIER = {"n": 1024, "resolution": 32, "steps": 300}  # bigan.data.captions.train_attribute_classifier's


@functools.cache
def prompt_groups() -> dict:
    """{group: [(scene index, caption)]} of the evaluation prompts (renders of HELD_OUT_SEED's scenes)."""
    from bigan.data.captions import HELD_OUT_SEED, held_out_items, training_items

    return {"": [(i, text) for i, _, text in training_items(EVAL_PROMPTS, seed=HELD_OUT_SEED)],
            "_held_out": [(i, text) for i, _, text in held_out_items(EVAL_PROMPTS)]}


def attribute_classifier(path: str, accelerator):
    """The TorchScript classifier at `path`, or ('') one trained on first use and cached (by the main process
    first; the other processes then read it)."""
    from bigan.data.captions import train_attribute_classifier
    from bigan.data.demo import cache_dir

    if path:
        return torch.jit.load(path, map_location=accelerator.device).eval()
    cached = cache_dir() / "attributes" / "classifier-{n}-{resolution}px-{steps}.pt".format(**CLASSIFIER)
    cached_once(accelerator, cached, "the attribute classifier of the attr metric",
                lambda tmp: train_attribute_classifier(**CLASSIFIER).save(str(tmp)))
    return torch.jit.load(str(cached), map_location=accelerator.device).eval()


def cached_once(accelerator, cached, what: str, write):
    """Make `cached` with write(temporary path) unless it exists: the main process first, the others then find
    it (or, on a node that cannot see it, make their own); renamed into place whole, so a crash or another job
    writing the same cache leaves no torn file."""
    import os
    import uuid

    with accelerator.main_process_first():
        if not cached.exists():
            if accelerator.is_main_process:
                print(f"bigan: training {what} once, into {cached}", flush=True)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            write(tmp)
            tmp.rename(cached)


class AttributeAccuracy:
    """attr_acc{group}, attr_all{group}, attr_acc_real{group}, from the attribute classifier's readings."""

    width = 4  # sums per group

    def __init__(self, classifier):
        self.classifier = classifier

    def sums(self, images: torch.Tensor, texts: list[str], which: torch.Tensor) -> torch.Tensor:
        """(named attributes right, named attributes, images with all right, images) of uint8 images drawn
        from texts[which]."""
        from bigan.data.captions import HEADS, mentioned

        logits = self.classifier(images)
        picks = {name: logits[name].argmax(1).tolist() for name in HEADS}
        sums = torch.zeros(4, dtype=torch.float64)
        for i, prompt in enumerate(texts[j] for j in which.tolist()):
            named = {k: v for k, v in mentioned(prompt).items() if k in HEADS}
            right = sum(HEADS[k][picks[k][i]] == v for k, v in named.items())
            sums += torch.tensor([right, len(named), float(right == len(named)), 1], dtype=torch.float64)
        return sums

    def results(self, group: str, generated: torch.Tensor, real: torch.Tensor) -> dict:
        return {f"attr_acc{group}": float(generated[0] / generated[1]),
                f"attr_all{group}": float(generated[2] / generated[3]),
                f"attr_acc_real{group}": float(real[0] / real[1])}


def scorers(family, accelerator, wanted) -> list:
    """The scorers of the wanted prompt metrics (attr, rprec, clip), their networks loaded or trained."""
    from bigan.families.text2image_metrics import ClipScore, RPrecision

    o = family.config.family_options
    found = []
    if "attr" in wanted:
        found.append(AttributeAccuracy(attribute_classifier(o.attributes, accelerator)))
    if "rprec" in wanted:
        found.append(RPrecision(accelerator))
    if "clip" in wanted:
        found.append(ClipScore(o.clip, accelerator.device))
    return found


@torch.no_grad()
def prompted_scores(family, g, accelerator, n: int, seed: int, batch: int, wanted) -> dict:
    """The prompt metrics of n images (n / 2 per group) and of the prompts' real renders; this rank draws
    blocks rank, rank + world, ... and the sums over the ranks are the results (the same on every rank)."""
    from bigan.data.captions import HELD_OUT_SEED, render_captioned_batch

    found = scorers(family, accelerator, wanted)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    z_dim, res, per_group = family.config.model.z_dim, family.config.data.resolution, max(n // 2, 1)
    sums = []
    for items in prompt_groups().values():
        texts = [text for _, text in items]
        generated = [torch.zeros(s.width, dtype=torch.float64) for s in found]
        real = [torch.zeros(s.width, dtype=torch.float64) for s in found]
        sentences = g.encode(texts)
        for block in range(rank, (per_group + batch - 1) // batch, world):
            which = torch.arange(block * batch, min(per_group, (block + 1) * batch)) % len(items)
            z = torch.randn(len(which), z_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
            images = to_uint8(g(z.to(device), sentences[which.to(device)]))
            generated = [total + s.sums(images, texts, which) for total, s in zip(generated, found)]
        if rank == 0:  # the ceiling: the prompts' own scenes, rendered
            renders, _ = render_captioned_batch(HELD_OUT_SEED, [i for i, _ in items], res)
            real = [s.sums(renders.to(device), texts, torch.arange(len(items))) for s in found]
        sums.append(torch.cat(generated + real))
    stacked = torch.stack(sums).to(device)
    total = accelerator.reduce(stacked, "sum").cpu() if world > 1 else stacked.cpu()
    result = {}
    for group, row in zip(prompt_groups(), total):
        parts = row.split([s.width for s in found] * 2)
        for s, generated, real in zip(found, parts[:len(found)], parts[len(found):]):
            result.update(s.results(group, generated, real))
    return result


@torch.no_grad()
def caption_fid(family, g, data, extractor, accelerator, n: int, wanted: list, seed: int, batch: int) -> dict:
    """fid/kid of images drawn from the first n captions of `data` against the images of `data`."""
    from bigan.metrics.evaluate import _counted, _in_order, _usable, evaluate

    shard_set = _counted(data)
    n = _usable(sum(shard_set.counts), n, accelerator.num_processes)
    z_dim, device = family.config.model.z_dim, accelerator.device

    def blocks():
        first = accelerator.process_index * (n // accelerator.num_processes)
        pending = []
        for i, sample in _in_order(shard_set, family.config.data.resolution, accelerator, n):
            pending += sample["caption"]
            if len(pending) == batch or i == n // accelerator.num_processes - 1:
                indices = torch.arange(first, first + len(pending))
                z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(j)))
                                 for j in indices])
                yield indices, to_uint8(g(z.to(device), g.encode(pending)))
                first, pending = first + len(pending), []

    result = evaluate(blocks(), data, family.config.data.resolution, extractor, accelerator, n, wanted, batch)
    return {k: v for k, v in result.items() if k != "n"}
