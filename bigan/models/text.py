"""Text side of text-to-image GANs: a word tokenizer, a small transformer text encoder, an image
encoder and the contrastive (CLIP-like) pre-training that aligns them, R-precision, and a frozen
wrapper for a Hugging Face text encoder saved on local disk.

Every text encoder here maps a list of prompts to the same triple:

    sentence (N, D)     one embedding per prompt: what a GAN is conditioned on
    tokens   (N, L, D)  one feature per token, zero at padding (for word-level attention)
    mask     (N, L)     True at real tokens

An empty prompt is two real tokens (begin, end), never an all-padding row, so attention always
has a key to attend to and no NaN comes out of it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, one each: "A red sun, still water." -> a red sun , still water ."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Word-level: a vocabulary of the training captions' words; any other word is <unk>."""

    def __init__(self, vocabulary: list[str], max_length: int = 32):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (begin and end tokens), got {max_length}")
        self.vocabulary = list(SPECIALS) + [w for w in vocabulary if w not in SPECIALS]
        self.max_length = max_length
        self._ids = {w: i for i, w in enumerate(self.vocabulary)}

    @classmethod
    def build(cls, captions, max_length: int = 32, min_count: int = 1) -> "Tokenizer":
        """From training captions: every word seen at least min_count times, most frequent first."""
        counts: dict[str, int] = {}
        for text in captions:
            for word in words(text):
                counts[word] = counts.get(word, 0) + 1
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept, max_length)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (N, L) long, mask (N, L) bool): <bos> words <eos>, cut to max_length, padded to the longest."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[BOS] + [self._ids.get(w, UNK) for w in words(t)][: self.max_length - 2] + [EOS] for t in texts]
        length = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != PAD

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Back to text (words joined by spaces, special tokens dropped, unknown words as <unk>)."""
        return [" ".join(self.vocabulary[i] for i in row if i not in (PAD, BOS, EOS)) for row in ids.tolist()]

    def state_dict(self) -> dict:
        return {"vocabulary": self.vocabulary[len(SPECIALS):], "max_length": self.max_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        missing = {"vocabulary", "max_length"} - set(state)
        if missing:
            raise ValueError(f"tokenizer state lacks {', '.join(sorted(missing))}: not a Tokenizer.state_dict()")
        return cls(list(state["vocabulary"]), int(state["max_length"]))

    def save(self, path):
        Path(path).write_text(json.dumps(self.state_dict()))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        return cls.from_state_dict(json.loads(Path(path).read_text()))


class TextEncoder(nn.Module):
    """A small pre-norm transformer over token ids with learned positions and a padding mask;
    the sentence embedding is the mean of the real tokens' features, projected to `dim` (default: width)."""

    def __init__(self, vocab_size: int, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 32,
                 dim: int | None = None):
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(max_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # no nested tensors: they would drop the padded tail, and tokens must stay (N, L, D)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.project = nn.Linear(width, dim or width)

    @property
    def dim(self) -> int:
        return self.project.out_features

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        if ids.shape[1] > self.max_length:
            raise ValueError(f"{ids.shape[1]} tokens, the encoder takes at most max_length={self.max_length}")
        # (no check of the mask here: it would read the device from the host in every step; Tokenizer.encode
        # gives every prompt <bos> and <eos>, so no row is all padding)
        h = self.embed(ids) + self.positions[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        tokens = self.norm(h) * mask[..., None]
        mean = tokens.sum(1) / mask.sum(1, keepdim=True)
        return self.project(mean), tokens, mask


class ImageEncoder(nn.Module):
    """Images in [-1, 1] (N, 3, R, R) -> (N, dim): stride-2 convs down to 4x4, then a linear layer."""

    def __init__(self, resolution: int = 32, dim: int = 128, width: int = 32):
        super().__init__()
        layers, channels, size = [nn.Conv2d(3, width, 3, 1, 1), nn.LeakyReLU(0.2)], width, resolution
        while size > 4:
            out = min(channels * 2, 8 * width)
            layers += [nn.Conv2d(channels, out, 4, 2, 1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
            channels, size = out, size // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def info_nce(image_embeddings, text_embeddings, logit_scale):
    """CLIP's symmetric InfoNCE (Radford et al. 2021) with a learned temperature:

        s_ij = exp(logit_scale) * cos(image_i, text_j)      # exp(logit_scale) capped at 100
        loss = (CE(s, i -> i) + CE(sᵀ, i -> i)) / 2         # each image picks its caption and back
    """
    images = F.normalize(image_embeddings.float(), dim=1)
    texts = F.normalize(text_embeddings.float(), dim=1)
    scale = logit_scale.float().exp().clamp(max=100)
    logits = scale * images @ texts.T
    target = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, {"Loss/InfoNCE": loss.detach(), "Contrastive/temperature": 1 / scale.detach(),
                  "Contrastive/accuracy": (logits.detach().argmax(1) == target).float().mean()}


@dataclass
class ContrastiveModels:
    text_encoder: TextEncoder
    image_encoder: ImageEncoder
    logit_scale: nn.Parameter
    losses: list[float] = field(default_factory=list)


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


def pretrain_contrastive(images: torch.Tensor, captions: list[str], tokenizer: Tokenizer, steps: int,
                         dim: int = 64, text_encoder: TextEncoder | None = None,
                         image_encoder: ImageEncoder | None = None, batch_size: int = 32, lr: float = 1e-3,
                         seed: int = 0, device="cpu", progress=None) -> ContrastiveModels:
    """Align a text encoder and an image encoder on (image, caption) pairs with info_nce, as DF-GAN's
    DAMSM or CLIP do before GAN training; images are uint8 or [-1, 1] NCHW (kept where they are; each
    batch goes to `device`). Encoders default to small fresh ones of width `dim`; returns them (on
    `device`) with the learned temperature and the loss per step. progress(step, loss) is called every
    100 steps and at the last. The caller's random state is left as it was."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    from bigan.seeding import isolated

    with isolated():
        return _pretrain(images, captions, tokenizer, steps, dim, text_encoder, image_encoder, batch_size, lr, seed,
                         device, progress)


def _pretrain(images, captions, tokenizer, steps, dim, text_encoder, image_encoder, batch_size, lr, seed, device,
              progress) -> ContrastiveModels:
    torch.manual_seed(seed)
    if text_encoder is None:
        text_encoder = TextEncoder(len(tokenizer), dim, max_length=tokenizer.max_length)
    if image_encoder is None:
        image_encoder = ImageEncoder(images.shape[-1], text_encoder.dim)
    text_encoder, image_encoder = text_encoder.to(device).train(), image_encoder.to(device).train()
    logit_scale = nn.Parameter(torch.tensor(1 / 0.07, device=device).log())  # CLIP's initial temperature 0.07
    params = [*text_encoder.parameters(), *image_encoder.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ids, mask = tokenizer.encode(captions)  # padding to the longest caption changes no embedding
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = torch.randperm(len(images), generator=generator)[:batch_size]
        sentence, _, _ = text_encoder(ids[batch].to(device), mask[batch].to(device))
        loss, _ = info_nce(image_encoder(_as_float_images(images[batch]).to(device)), sentence, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None and (step % 100 == 99 or step == steps - 1):
            progress(step + 1, sum(losses[-100:]) / len(losses[-100:]))
    optimizer.zero_grad(set_to_none=True)  # (no stale gradients on what is returned)
    return ContrastiveModels(text_encoder.eval(), image_encoder.eval(), logit_scale, losses)


def r_precision(image_embeddings, text_embeddings, candidates: int = 100, generator=None,
                block: int = 1024) -> float:
    """AttnGAN / DF-GAN R-precision: for each image, its own text among candidates - 1 texts of other
    images drawn at random; the share of images whose own text is strictly the most cosine-similar.
    candidates is capped at the number of images; chance level is 1 / candidates."""
    if candidates < 2:
        raise ValueError(f"r_precision needs at least 2 candidates (the true text and a mismatch), got {candidates}")
    images = F.normalize(image_embeddings.float(), dim=1)
    texts = F.normalize(text_embeddings.float(), dim=1)
    n = len(images)
    r = min(candidates, n)
    hits = 0
    for start in range(0, n, block):  # blocks of rows keep memory at block x n
        rows = torch.arange(start, min(start + block, n))
        draw = torch.rand(len(rows), n, generator=generator)
        draw[torch.arange(len(rows)), rows] = 2.0  # never pick the image's own text as a mismatch
        others = draw.argsort(1)[:, : r - 1]
        sims = (images[rows, None, :] * texts[others]).sum(-1)
        own = (images[rows] * texts[rows]).sum(-1)
        hits += int((own[:, None] > sims).all(1).sum())
    return hits / n


class TextEncoderError(RuntimeError):
    """A text encoder could not be loaded; the message is one line that names the path."""


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LocalHFTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder (CLIP's text tower, BERT, T5's encoder ...) from a folder
    written by save_pretrained; nothing is downloaded. The sentence embedding is the model's pooled
    output where it has one (CLIP: the end token's feature), else the mean of the real tokens."""

    def __init__(self, path, max_length: int = 77):
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_dir():
            raise TextEncoderError(f"text encoder {path}: no such folder (give a folder written by save_pretrained)")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise TextEncoderError(f"text encoder {path} needs transformers: pip install transformers") from None
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as error:  # transformers raises OSError, ValueError, KeyError ... over many lines
            raise TextEncoderError(f"text encoder {path} is not a Hugging Face model and tokenizer folder: "
                                   f"{_one_line(error)}") from None
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5 and the like: the encoder alone
        self.model = getattr(model, "text_model", model).eval().requires_grad_(False)  # CLIPModel: its text tower
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.path = path

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: stays in eval mode (no dropout) inside a model set to train

    @torch.no_grad()
    def forward(self, texts: str | list[str]):
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        if not bool(mask.any(1).all()):  # attention over no key at all would give NaN
            empty = texts[int((~mask.any(1)).nonzero()[0])]
            raise TextEncoderError(f"text encoder {self.path}: its tokenizer gives no token for {empty!r}")
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state * mask[..., None]
        pooled = getattr(out, "pooler_output", None)
        sentence = pooled if pooled is not None else tokens.sum(1) / mask.sum(1, keepdim=True)
        return sentence, tokens, mask
