"""The rprec and clip metrics of model.arch=dfgan: scorers of images drawn from the captioned demo's prompts
(bigan.families.text2image_eval.prompted_scores draws them, and the real renders of the same prompts).

rprec: AttnGAN / DF-GAN R-precision. An evaluation pair, a text encoder and an image encoder of bigan's own
(bigan.models.text), is aligned by contrastive pre-training on captioned demo renders (all attribute
combinations, held-out ones too: it scores them), trained once on first use and cached under $BIGAN_CACHE.
Each image's own prompt competes with mismatched captions of the same group; a hit is the own prompt strictly
the most cosine-similar. The demo's captions name a few attributes each, in many wordings, so another caption
of the group often says nothing the image contradicts ("a red sun over a lake" beside "a crimson sun above
three ridges"): a mismatch is only a caption that names one of the prompt's attributes with another value
(bigan.data.captions.mentioned). Candidates: min(100, 1 + the fewest such mismatches of a prompt in the group),
the same for every prompt (chance is 1 / candidates); each prompt's mismatches are drawn once, seeded by its
position, so the score depends neither on the ranks nor on n.

clip: CLIP score (Hessel et al. 2021, w = 100, clamped per image; torchmetrics clamps the mean instead):
100 * max(cos(image, prompt), 0) in a local CLIP model's embedding (dfgan.clip; preprocessing by its own
processor), averaged over the images.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from bigan.metrics.features import ExtractorError

CANDIDATES = 100  # R-precision's, at most (AttnGAN, DF-GAN)
PAIR = {"n": 1024, "resolution": 32, "steps": 200, "dim": 64, "width": 16}  # the evaluation pair's training
PAIR_MAX_WORDS = 48  # tokens of a caption (the demo's are 25 words at most)


# ---------------------------------------------------------------- rprec: the evaluation pair

def _pair_modules(vocabulary_size: int, settings: dict):
    from bigan.models.text import ImageEncoder, TextEncoder

    text = TextEncoder(vocabulary_size, settings["dim"], depth=1, heads=4, max_length=PAIR_MAX_WORDS)
    return text, ImageEncoder(settings["resolution"], settings["dim"], settings["width"])


@torch.enable_grad()  # (also when called under no_grad: an evaluation training it on first use)
def train_evaluation_pair(n: int, resolution: int, steps: int, dim: int, width: int) -> dict:
    """A text and an image encoder aligned by bigan.models.text.pretrain_contrastive on n captioned renders
    of the classifier's seed, one caption each; as {"tokenizer", "text", "image"} state (torch.save)."""
    import numpy as np

    from bigan.data.captions import _CAPTION_STREAM, CLASSIFIER_SEED, caption, render_captioned_batch
    from bigan.models.text import Tokenizer, pretrain_contrastive

    images, attributes = render_captioned_batch(CLASSIFIER_SEED, range(n), resolution)
    captions = [caption(a, np.random.default_rng([CLASSIFIER_SEED, i, _CAPTION_STREAM]))
                for i, a in enumerate(attributes)]
    from bigan.seeding import isolated

    tokenizer = Tokenizer.build(captions, PAIR_MAX_WORDS)
    settings = {"n": n, "resolution": resolution, "steps": steps, "dim": dim, "width": width}
    with isolated():  # the same start every time, and the caller's draws (a training run's) untouched
        torch.manual_seed(CLASSIFIER_SEED)
        text, image = _pair_modules(len(tokenizer), settings)
    pretrain_contrastive(images, captions, tokenizer, steps, text_encoder=text, image_encoder=image,
                         batch_size=64, lr=2e-3, seed=CLASSIFIER_SEED)
    return {"tokenizer": tokenizer.state_dict(), "text": text.state_dict(), "image": image.state_dict()}


def evaluation_pair(accelerator):
    """(tokenizer, text encoder, image encoder) of the rprec metric, trained on first use and cached by its
    settings (by the main process first; the other processes then read it)."""
    from bigan.data.demo import cache_dir
    from bigan.models.text import Tokenizer

    from bigan.families.text2image_eval import cached_once

    cached = cache_dir() / "rprec" / "pair-{n}-{resolution}px-{steps}-{dim}-{width}.pt".format(**PAIR)
    cached_once(accelerator, cached, "the evaluation pair of the rprec metric",
                lambda tmp: torch.save(train_evaluation_pair(**PAIR), tmp))
    state = torch.load(cached, map_location="cpu", weights_only=True)
    tokenizer = Tokenizer.from_state_dict(state["tokenizer"])
    text, image = _pair_modules(len(tokenizer), PAIR)
    text.load_state_dict(state["text"])
    image.load_state_dict(state["image"])
    return tokenizer, text.to(accelerator.device).eval(), image.to(accelerator.device).eval()


def mismatches(texts: list[str], candidates: int = CANDIDATES) -> torch.Tensor:
    """(P, r - 1) indices into texts: each prompt's mismatched captions, those naming one of its attributes with
    another value; r = min(candidates, 1 + the fewest a prompt has), drawn once per prompt (seeded by i)."""
    from bigan.data.captions import mentioned

    named = [mentioned(text) for text in texts]
    contradicting = [[j for j, other in enumerate(named) if any(k in other and other[k] != v for k, v in own.items())]
                     for own in named]
    r = min(candidates, 1 + min(len(c) for c in contradicting))
    if r < 2:
        empty = texts[min(range(len(texts)), key=lambda i: len(contradicting[i]))]
        raise ValueError(f"rprec: no caption of the group contradicts the prompt {empty!r}")
    picks = [torch.tensor(c)[torch.randperm(len(c), generator=torch.Generator().manual_seed(i))[:r - 1]]
             for i, c in enumerate(contradicting)]
    return torch.stack(picks)


class RPrecision:
    """rprec{group}, rprec_real{group}: the share of images whose own prompt beats all its mismatches."""

    width = 2  # sums per group

    def __init__(self, accelerator):
        self.tokenizer, self.text, self.image = evaluation_pair(accelerator)
        self.resolution = PAIR["resolution"]
        self.groups = {}  # texts -> (their embeddings, their mismatches)

    def _group(self, texts: list[str]):
        key = tuple(texts)
        if key not in self.groups:
            device = self.image.body[0].weight.device
            ids, mask = self.tokenizer.encode(texts)
            embedded = F.normalize(self.text(ids.to(device), mask.to(device))[0].float(), dim=1)
            self.groups[key] = embedded, mismatches(texts).to(device)
        return self.groups[key]

    def sums(self, images: torch.Tensor, texts: list[str], which: torch.Tensor) -> torch.Tensor:
        """(hits, images) of uint8 images drawn from texts[which]."""
        embedded, others = self._group(texts)
        x = F.interpolate(images.float() / 127.5 - 1, size=(self.resolution, self.resolution), mode="area")
        features = F.normalize(self.image(x).float(), dim=1)
        which = which.to(features.device)
        own = (features * embedded[which]).sum(1)
        against = (features[:, None] * embedded[others[which]]).sum(-1)
        hits = (own[:, None] > against).all(1).sum()
        return torch.tensor([float(hits), len(images)], dtype=torch.float64)

    def results(self, group: str, generated: torch.Tensor, real: torch.Tensor) -> dict:
        return {f"rprec{group}": float(generated[0] / generated[1]), f"rprec_real{group}": float(real[0] / real[1])}


# ---------------------------------------------------------------- clip: a local CLIP model

class ClipError(ExtractorError):
    """A CLIP model could not be loaded; one line naming the key (or flag) and the folder (an ExtractorError:
    bigan.train and bigan-eval print it as one)."""


def is_clip_folder(path: str) -> bool:
    """A cheap look (config checks): a folder whose config.json says model_type clip."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def clip_model(path: str, key: str = "dfgan.clip"):
    """(CLIPModel in eval mode, its processor) from a folder written by save_pretrained, loaded once; nothing is
    downloaded. A ClipError names `key` (the config key or flag that gave the folder)."""
    try:
        return _clip_model(str(path))
    except ClipError as error:
        raise ClipError(f"{key}: {error}") from None


@functools.cache
def _clip_model(path: str):
    from bigan.models.text import _one_line

    if not Path(path).is_dir():
        raise ClipError(f"{path} is no folder (give a CLIP model folder written by save_pretrained)")
    if not is_clip_folder(path):
        raise ClipError(f"{path} holds no CLIP model (its config.json does not say model_type clip)")
    try:
        from transformers import AutoProcessor, CLIPModel
    except ImportError:
        raise ClipError(f"{path}: the clip metric needs transformers: pip install transformers") from None
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, TypeError ... over many lines
        raise ClipError(f"{path} is not a CLIP model folder with its processor (CLIPModel and CLIPProcessor "
                        f"save_pretrained): {_one_line(error)}") from None
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):  # (a tokenizer alone)
        raise ClipError(f"{path} holds no CLIP processor (CLIPProcessor.save_pretrained writes it)")
    return model.eval().requires_grad_(False), processor


class ClipScore:
    """clip{group}, clip_real{group}: the mean of 100 * max(cos(image, prompt), 0) in CLIP's embedding."""

    width = 2  # sums per group

    def __init__(self, path: str, device, key: str = "dfgan.clip"):
        model, self.processor = clip_model(path, key)
        self.model, self.device = model.to(device), device

    def sums(self, images: torch.Tensor, texts: list[str], which: torch.Tensor) -> torch.Tensor:
        """(sum of the scores, images) of uint8 images drawn from texts[which]."""
        max_length = self.processor.tokenizer.model_max_length
        batch = self.processor(text=[texts[i] for i in which.tolist()], images=list(images.cpu()),
                               return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
        cos = (F.normalize(out.image_embeds.float(), dim=1) * F.normalize(out.text_embeds.float(), dim=1)).sum(1)
        return torch.tensor([float((100 * cos.clamp(min=0)).double().sum()), len(images)], dtype=torch.float64)

    def results(self, group: str, generated: torch.Tensor, real: torch.Tensor) -> dict:
        return {f"clip{group}": float(generated[0] / generated[1]), f"clip_real{group}": float(real[0] / real[1])}
