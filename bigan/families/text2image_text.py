"""The networks of model.arch=dfgan around DF-GAN's G and D, and where their sentences come from
(dfgan.text_encoder):

    joint         bigan's TextEncoder inside D, trained by D's Adam (G keeps a copy, refreshed after
                  each D step)
    contrastive   bigan's TextEncoder pre-trained once before the GAN, CLIP's symmetric InfoNCE
                  against an image encoder of bigan's own (bigan.models.text.pretrain_contrastive: the
                  role DAMSM plays for DF-GAN), on the first dfgan.pretrain_images images and captions
                  of data.shards; then frozen. Cached under $BIGAN_CACHE/text_encoders, keyed by what
                  it depends on; rank 0 trains it (or reads the cache) and every rank takes its weights.
    a folder      a frozen local Hugging Face text encoder (save_pretrained; nothing is downloaded).
                  It stays outside G's weights: checkpoints, the EMA and the export hold G alone, and
                  architecture.json records the folder, from which bigan-sample loads it again.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from bigan.models import dfgan
from bigan.models.text import (ImageEncoder, LocalHFTextEncoder, TextEncoder, TextEncoderError, Tokenizer,
                              pretrain_contrastive)

OWN_ENCODERS = ("joint", "contrastive")  # dfgan.text_encoder values that are not a folder
PRETRAIN_RESOLUTION = 64  # contrastive pre-training sees the images at most this large (enough to tell scenes apart)
PRETRAIN = {"batch_size": 64, "lr": 1e-3}  # pretrain_contrastive's settings (CLIP-like: AdamW, learned temperature)
IMAGE_WIDTH = 16  # the image encoder's first width (then x2 per halving, up to x8): ~0.1 s a step of 64 at 32 px on a CPU


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of module whose parameters are buffers: no optimizer steps them, EMA and checkpoints keep them."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())
    return clone


class _Outside:
    """Holds a module beside a network rather than in it: no state_dict, optimizer or .to() reaches it, and
    deepcopy (the EMA's copy of G) shares it instead of copying a frozen model."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class PromptedGenerator(nn.Module):
    """The "g" network: G(z, sentences) -> images, and encode(prompts) -> sentences, through a frozen copy of
    bigan's text encoder in G's buffers (with its tokenizer), or through a Hugging Face encoder held outside."""

    def __init__(self, generator: dfgan.Generator, text: nn.Module, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.generator, self.tokenizer = generator, tokenizer
        if isinstance(text, LocalHFTextEncoder):
            self.text, self.outside = None, _Outside(text)
        else:
            self.text, self.outside = frozen_copy(text), None

    def forward(self, z, sentences):
        return self.generator(z, sentences)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.generator.parameters()).device
        if self.outside is not None:
            return encode_with(self.outside.module.to(device), None, prompts, device)
        return encode_with(self.text, self.tokenizer, prompts, device)

    @torch.no_grad()
    def copy_text_encoder(self, text: TextEncoder):
        """After a D step (dfgan.text_encoder=joint): the text encoder's weights as they now are."""
        torch._foreach_copy_(list(self.text.buffers()), [p.detach() for p in text.parameters()])


@torch.no_grad()
def encode_with(text: nn.Module, tokenizer: Tokenizer | None, prompts: list[str], device) -> torch.Tensor:
    """Sentence embeddings (N, D) float of prompts: bigan's encoder through the tokenizer, a Hugging Face
    one (tokenizer None) through its own."""
    if tokenizer is None:
        return text(prompts)[0].float()
    ids, mask = tokenizer.encode(prompts)
    return text(ids.to(device), mask.to(device))[0].float()


class TextDiscriminator(nn.Module):
    """The "d" network: DF-GAN's D, and (dfgan.text_encoder=joint) the text encoder, trained together. As every
    bigan D, d(images, sentences) -> logits; d(images, sentences, mismatched=True) -> (those, the logits of each
    image with its neighbour's sentence, from the same features); d(ids=, mask=) -> the sentences of token
    ids. The phases run all three through the network's wrapper, so DDP and ZeRO see every parameter, and
    MA-GP differentiates in sentences that are an input of D's forward, not an output (ZeRO-3 hands a
    module's outputs back through hooks of its own)."""

    def __init__(self, discriminator: dfgan.Discriminator, text: TextEncoder | None):
        super().__init__()
        self.discriminator, self.text = discriminator, text

    def forward(self, images=None, sentences=None, ids=None, mask=None, mismatched: bool = False):
        if images is None:
            return self.text(ids, mask)[0]
        if not mismatched:
            return self.discriminator(images, sentences)
        features = self.discriminator.features(images)
        return (self.discriminator.logits(features, sentences),
                self.discriminator.logits(features, dfgan.mismatched(sentences)))


# ---------------------------------------------------------------- a local Hugging Face encoder


@functools.cache
def hf_encoder(path: str, max_words: int) -> LocalHFTextEncoder:
    """The frozen encoder in `path`, loaded once per process (raises TextEncoderError in one line)."""
    return LocalHFTextEncoder(path, max_length=max_words)


def text_encoder_checks(config) -> list[tuple]:
    """(key, ok, message) of the dfgan.text_encoder settings (DFGAN.checks)."""
    o = config.family_options
    joint_only = [("dfgan.text_lr", o.text_encoder == "joint" or o.text_lr == 1.0,
                   "trains the text encoder with D: it applies to dfgan.text_encoder=joint only")]
    if o.text_encoder in OWN_ENCODERS:
        return [*joint_only, ("dfgan.pretrain_images", o.pretrain_images >= 2, "must be >= 2"),
                ("dfgan.pretrain_steps", o.pretrain_steps >= 1, "must be >= 1")]
    try:
        width = hf_encoder(o.text_encoder, o.max_words).dim
    except TextEncoderError as error:
        return [("dfgan.text_encoder", False, f"must be joint, contrastive or a local Hugging Face model folder: "
                                              f"{error}")]
    return [*joint_only, ("dfgan.cond_dim", o.cond_dim == width,
                          f"is the sentence width: {o.text_encoder} gives {width} (leave dfgan.cond_dim unset)")]


# ---------------------------------------------------------------- contrastive pre-training


def contrastive_text_encoder(family) -> TextEncoder:
    """dfgan.text_encoder=contrastive: the family's TextEncoder with pre-trained weights, the same on every
    rank (rank 0's; an error there is raised on every rank), frozen. A run that resumes from a checkpoint
    takes the checkpoint's (family.state) and pre-trains nothing. Leaves the global RNG as it was (every
    rank then builds the same G and D)."""
    from accelerate import PartialState

    from bigan.seeding import isolated
    from bigan.training.ranks import on_rank_zero

    state = PartialState()
    with isolated():
        torch.manual_seed(family.config.train.seed)  # (what the cache's key says: the same start every time)
        text = family._text_encoder()
        if not on_rank_zero(state, lambda: _resumes(family.config)):
            text.load_state_dict(on_rank_zero(state, lambda: pretrained_weights(family, text, state.device)))
    return text.requires_grad_(False).eval()


def _resumes(config) -> bool:
    """Whether this run will load a checkpoint (which holds the text encoder)."""
    from bigan import checkpoint

    return checkpoint.resolve(Path(config.run.dir), config.run.resume)[0] is not None


def _cache_key(family, source: str) -> str:
    from bigan.data.stream import resolve_shards

    c, o = family.config, family.config.family_options
    urls = resolve_shards(source).urls
    sizes = [(u, *((os.path.getsize(u), os.path.getmtime(u)) if os.path.exists(u) else ())) for u in urls]
    what = {"shards": sizes, "resolution": c.data.resolution, "vocabulary": o.vocabulary, "seed": c.train.seed,
            **{k: getattr(o, k) for k in ("cond_dim", "text_width", "text_depth", "text_heads", "max_words",
                                           "pretrain_images", "pretrain_steps")}, **PRETRAIN, "image_width": IMAGE_WIDTH, "version": 2}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_weights(family, text: TextEncoder, device) -> dict:
    """The pre-trained text encoder's state dict (on the CPU), from the cache or trained now and cached."""
    from bigan.data.demo import cache_dir
    from bigan.training.data import data_source

    o = family.config.family_options
    source = data_source(family)
    cached = cache_dir() / "text_encoders" / f"contrastive-{_cache_key(family, source)}.pt"
    if cached.exists():
        print(f"bigan: text encoder pre-trained contrastively, from {cached}", flush=True)
        return torch.load(cached, map_location="cpu")
    images, captions = captioned_images(source, family.config.data.resolution, o.pretrain_images)
    print(f"bigan: pre-training the text encoder contrastively on {len(images)} images and captions of "
          f"{family.config.data.shards} ({o.pretrain_steps} steps, once; cached in {cached})", flush=True)
    start = time.time()

    def progress(step, loss):
        if step % 500 == 0 or step == o.pretrain_steps:
            print(f"bigan: text encoder pre-training step {step}/{o.pretrain_steps}: InfoNCE {loss:.3f} "
                  f"(chance {torch.tensor(float(PRETRAIN['batch_size'])).log():.3f}), {time.time() - start:.0f} s",
                  flush=True)

    image_encoder = ImageEncoder(images.shape[-1], text.dim, width=IMAGE_WIDTH)
    models = pretrain_contrastive(images, captions, family.tokenizer, o.pretrain_steps, text_encoder=text,
                                  image_encoder=image_encoder, seed=family.config.train.seed, device=device,
                                  progress=progress, **PRETRAIN)
    weights = {k: v.detach().cpu() for k, v in models.text_encoder.state_dict().items()}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")  # (jobs sharing the cache)
    torch.save(weights, tmp)
    tmp.rename(cached)  # whole or not at all
    return weights


def captioned_images(source: str, resolution: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n images (uint8 NCHW, centre-cropped to at most PRETRAIN_RESOLUTION px) and captions of a
    shard set, read in order (the shards are not counted first)."""
    import itertools

    import numpy as np

    from bigan.data.stream import DataError, _caption, decode_rgb, fit_square, read_shard, resolve_shards

    size = min(resolution, PRETRAIN_RESOLUTION)
    images, captions = [], []
    def samples():
        for url in resolve_shards(source).urls:
            for sample in read_shard(url):
                yield url, sample

    for url, sample in itertools.islice(samples(), n):
        text = _caption(sample)
        if text is None:
            raise DataError(f"{url}: sample {sample.get('__key__')} has no caption (dfgan.text_encoder=contrastive "
                            f"pre-trains on captioned images; write the shards with captions)")
        images.append(fit_square(decode_rgb(sample), size, None, None))
        captions.append(text)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions
