"""Text-to-image: DF-GAN (Tao et al., CVPR 2022) with a text encoder of bigan's own or a local one, as one family.

Networks (bigan.families.text2image_text; where sentences come from: dfgan.text_encoder):

    g   DF-GAN's G(z, sentence) (bigan.models.dfgan), holding a copy of bigan's text encoder as buffers
        (joint: refreshed after every D step), so that G's weights alone (a checkpoint's, the EMA's, the
        export) turn prompts into pictures. The tokenizer's words are dfgan.vocabulary, filled in from
        the shards' captions at start-up, so that config.yaml and architecture.json record them.
    d   DF-GAN's D, and (joint) the text encoder, stepped together by D's Adam

Two phases per iteration:

    D   DF-GAN's hinge loss on (real, its own caption), (G(z, s), s) and (real, its neighbour's caption:
        the batch's sentences rolled by one), plus the matching-aware gradient penalty on real pairs,
        dfgan.ma_gp * mean ||[grad_x D(x, s); grad_s D(x, s)]||^dfgan.ma_gp_power, differentiated in the
        image and the sentence (double backward, out of place through step.penalty)
    G   -D(G(z, s), s) through D frozen, s the sentences (detached) of the captions D just saw

On DeepSpeed, G may take any ZeRO stage and D stages 1 and 2 (D on ZeRO-3 only with dfgan.ma_gp=0).

Evaluation (bigan.families.text2image_eval, text2image_metrics): of images drawn from the captioned
demo's prompts (unseen scenes, held-out attribute combinations apart, real renders of the same
prompts as the ceiling), attribute accuracy (attr, an attribute classifier), R-precision (rprec, an
evaluation pair of bigan's own) and CLIP score (clip, a local CLIP); fid and kid of images drawn from
the reference set's own captions.
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bigan import losses
from bigan.families.base import Family, Network, Phase, Samples
from bigan.families.text2image_text import (OWN_ENCODERS, PromptedGenerator, TextDiscriminator,
                                            contrastive_text_encoder, encode_with, hf_encoder,
                                            text_encoder_checks)
from bigan.models import dfgan
from bigan.models.text import UNK, TextEncoder, TextEncoderError, Tokenizer, words

GRID_PROMPTS = 8  # rows of the TensorBoard grids: held-out prompts, one row each


def _f(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class DFGANOptions:
    depth: int = _f(1, "G and D blocks per resolution (DF-GAN: 1); model.g_channels and model.d_channels are "
                       "DF-GAN's ngf and ndf")
    cond_dim: int = _f(256, "sentence embedding size: what G's fusion blocks and D's head read")
    text_width: int = _f(128, "text encoder width (a small transformer over the caption's words)")
    text_depth: int = _f(2, "text encoder layers")
    text_heads: int = _f(4, "text encoder attention heads (must divide dfgan.text_width)")
    text_lr: float = _f(1.0, "learning-rate multiplier of the text encoder within D's Adam")
    max_words: int = _f(32, "tokens of a caption at most, begin and end included (the rest is cut)")
    vocabulary_size: int = _f(10_000, "the shards' most frequent caption words the tokenizer keeps; others "
                                      "read as unknown")
    vocabulary: str = _f("", "the tokenizer's words, space-separated ('' = the shards' caption vocabulary, "
                             "filled in at start-up)")
    text_encoder: str = _f("contrastive", "where sentences come from: 'contrastive' (bigan's encoder pre-trained "
                                          "once on data.shards' images and captions with CLIP's loss, then frozen, as "
                                          "DF-GAN's DAMSM), 'joint' (bigan's encoder, trained with D), or the folder "
                                          "of a local Hugging Face text encoder (frozen; dfgan.cond_dim becomes its "
                                          "width)")
    pretrain_images: int = _f(5000, "text_encoder=contrastive: images and captions it is pre-trained on (the "
                                    "first of data.shards)")
    pretrain_steps: int = _f(1000, "text_encoder=contrastive: pre-training steps of 64 pairs")
    ma_gp: float = _f(2.0, "matching-aware gradient penalty weight on real pairs (DF-GAN: 2; 0 = off)")
    ma_gp_power: float = _f(6.0, "the power of the gradient norm in it (DF-GAN: 6)")
    attributes: str = _f("", "attr metric: TorchScript attribute classifier of the captioned demo "
                             "('' = trained on first use, cached under $BIGAN_CACHE)")
    clip: str = _f("", "clip metric: folder of a local CLIP model and its processor (save_pretrained of "
                       "transformers' CLIPModel and CLIPProcessor; nothing is downloaded)")


# what the weights' shapes depend on, of the section above (architecture.json; bigan-sample rebuilds from it)
ARCHITECTURE_KEYS = ("depth", "cond_dim", "text_width", "text_depth", "text_heads", "max_words", "vocabulary",
                     "text_encoder")


class DFGAN(Family):
    name = "dfgan"
    options = DFGANOptions
    captioned = True
    metrics = ("attr", "rprec", "clip", "fid", "kid")
    data_free_metrics = ("attr", "rprec", "clip")  # (prompts and renders of the captioned demo's own scenes)
    sample_flags = ("seed", "truncation", "interpolate", "prompt", "prompts", "prompt_to")
    architecture_defaults = {"dfgan.text_encoder": "joint"}  # (checkpoints from before the key: D trained it)

    # -- configuration
    @classmethod
    def resolve(cls, config, world_size: int):
        """DF-GAN's hinge loss and MA-GP instead of loss.name's default and R1, and the captioned demo instead of
        the plain one, unless set."""
        if "data.shards" not in config.given:
            config.data.shards = "demo_captions"
        if "loss.name" not in config.given:
            config.loss.name = "hinge"
        if "loss.r1" not in config.given:
            config.loss.r1 = 0.0
        o = config.family_options
        if o.text_encoder not in OWN_ENCODERS:  # (absolute: bigan-sample may run from another folder)
            o.text_encoder = str(Path(o.text_encoder).expanduser().absolute())
        if o.text_encoder not in OWN_ENCODERS and "dfgan.cond_dim" not in config.given:
            try:
                o.cond_dim = hf_encoder(o.text_encoder, o.max_words).dim
            except TextEncoderError:
                pass  # (checks() names the key and what is wrong)

    @classmethod
    def checks(cls, config) -> list[tuple]:
        from bigan.families.text2image_metrics import is_clip_folder

        o, wanted = config.family_options, {x.strip() for x in config.eval.metrics.split(",")}
        return [("data.shards", config.data.shards != "demo", "model.arch=dfgan trains on captioned images: "
                 "data.shards=demo_captions (the captioned demo) or shards written with captions"),
                ("loss.name", config.loss.name == "hinge", "model.arch=dfgan trains with DF-GAN's hinge loss"),
                ("loss.r1", config.loss.r1 == 0, "model.arch=dfgan regularizes D with MA-GP (dfgan.ma_gp), not R1; "
                 "set loss.r1=0"),
                ("loss.pack", config.loss.pack == 1, "D judges each image with its own caption; set loss.pack=1"),
                ("model.num_classes", config.model.num_classes == 0, "model.arch=dfgan is conditioned on captions, "
                 "not classes; set model.num_classes=0"),
                ("augment.kind", config.augment.kind == "none", "model.arch=dfgan's D judges an image with its "
                 "caption, which augmentation may contradict (a colour shift, a cut-out sun); set augment.kind=none"),
                ("train.batch_size", config.train.batch_size >= 2, "must be >= 2: mismatched pairs take another "
                 "image's caption from the same batch"),
                ("eval.modes", not config.eval.modes, "mode coverage is for noise-to-image models"),
                ("eval.metrics", not wanted & {"is", "pr", "l1", "psnr"}, "model.arch=dfgan is evaluated with "
                 "attr, rprec, clip, fid and kid"),
                ("dfgan.depth", o.depth >= 1, "must be >= 1"),
                ("dfgan.cond_dim", o.cond_dim >= 1, "must be >= 1"),
                ("dfgan.text_width", o.text_width >= 1, "must be >= 1"),
                ("dfgan.text_depth", o.text_depth >= 1, "must be >= 1"),
                ("dfgan.text_heads", o.text_heads >= 1 and o.text_width % o.text_heads == 0,
                 f"must be >= 1 and divide dfgan.text_width ({o.text_width})"),
                ("dfgan.text_lr", o.text_lr > 0, "must be positive"),
                ("dfgan.max_words", o.max_words >= 2, "must be >= 2 (begin and end)"),
                ("dfgan.vocabulary_size", o.vocabulary_size >= 1, "must be >= 1"),
                ("dfgan.ma_gp", o.ma_gp >= 0, "must be >= 0 (0 = off)"),
                ("dfgan.ma_gp_power", o.ma_gp_power >= 1, "must be >= 1"),
                ("dfgan.attributes", not o.attributes or Path(o.attributes).is_file(), "file not found"),
                *text_encoder_checks(config),
                ("eval.metrics", not wanted & {"attr", "rprec", "clip"} or "demo_captions" in
                 config.data.shards.split("::"), "attr, rprec and clip score prompts of the captioned demo: they "
                 "need data.shards=demo_captions"),
                ("eval.metrics", "clip" not in wanted or o.clip, "clip needs a local CLIP model: set dfgan.clip=FOLDER"),
                ("dfgan.clip", not o.clip or is_clip_folder(o.clip), "must be a folder holding a CLIP model "
                 "(its config.json saying model_type clip)")]

    def architecture(self) -> dict:
        if self.own_encoder:
            self.vocabulary()  # (filled in first, so that architecture.json records it)
        return {k: v for k, v in super().architecture().items()
                if not k.startswith("dfgan.") or k.split(".", 1)[1] in ARCHITECTURE_KEYS}

    def vocabulary(self) -> list[str]:
        """dfgan.vocabulary's words; when it is empty, the shards' most frequent caption words, written into it
        (so that config.yaml and architecture.json record them)."""
        from bigan.data.stream import DataError, caption_vocabulary, mirror_caption

        c, o = self.config, self.config.family_options
        if not o.vocabulary:
            found = caption_vocabulary(c.data.shards, c.data.demo_images, c.data.resolution)
            if not found:
                raise DataError(f"data.shards: model.arch=dfgan trains on captioned images, and {c.data.shards} "
                                f"holds no captions (write shards with captions, or use data.shards=demo_captions)")
            found = found[:o.vocabulary_size]
            if c.data.flip:  # a flipped image's caption says "right" where the shards' said "left" (mirror_caption)
                found = list(dict.fromkeys(w for word in found for w in (word, mirror_caption(word))))
            o.vocabulary = " ".join(found)
        return o.vocabulary.split()

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | None:
        """bigan's word tokenizer; None with a Hugging Face encoder (which has its own)."""
        return Tokenizer(self.vocabulary(), self.config.family_options.max_words) if self.own_encoder else None

    @property
    def own_encoder(self) -> bool:
        return self.config.family_options.text_encoder in OWN_ENCODERS

    # -- networks and phases
    def _text_encoder(self) -> TextEncoder:
        o = self.config.family_options
        return TextEncoder(len(self.tokenizer), o.text_width, o.text_depth, o.text_heads, o.max_words, dim=o.cond_dim)

    def networks(self) -> dict[str, Network]:
        """g and d; with a frozen encoder (contrastive, Hugging Face), D holds none and the family keeps it
        (self.frozen_text) to encode each batch's captions."""
        t, m, o, res = self.config.train, self.config.model, self.config.family_options, self.config.data.resolution
        if o.text_encoder == "joint":
            text = self._text_encoder()
        elif o.text_encoder == "contrastive":
            text = self.frozen_text = contrastive_text_encoder(self)  # (checkpointed: family.state())
        else:
            text = self.frozen_text = hf_encoder(o.text_encoder, o.max_words)
        d = TextDiscriminator(dfgan.Discriminator(o.cond_dim, res, m.d_channels, o.depth),
                              text if o.text_encoder == "joint" else None)
        g = PromptedGenerator(dfgan.Generator(m.z_dim, o.cond_dim, res, m.g_channels, o.depth), text, self.tokenizer)
        return {"g": Network(g, t.g_lr, tuple(t.g_betas), t.adam_eps, keys="train.g_lr, train.g_betas"),
                "d": Network(d, t.d_lr, tuple(t.d_betas), t.adam_eps, lr_multipliers={"text.": o.text_lr},
                             keys="train.d_lr, train.d_betas, dfgan.text_lr")}

    def build_generator(self) -> nn.Module:
        """G as networks() builds it, its text encoder's weights left to G's checkpoint (no pre-training)."""
        m, o = self.config.model, self.config.family_options
        generator = dfgan.Generator(m.z_dim, o.cond_dim, self.config.data.resolution, m.g_channels, o.depth)
        text = self._text_encoder() if self.own_encoder else hf_encoder(o.text_encoder, o.max_words)
        return PromptedGenerator(generator, text, self.tokenizer)

    frozen_text = None  # the frozen encoder of dfgan.text_encoder=contrastive or a folder; None: joint (in D)

    def state(self) -> dict:
        return {"text_encoder": self.frozen_text} if self.config.family_options.text_encoder == "contrastive" else {}

    def to(self, device):
        if self.frozen_text is not None:
            self.frozen_text.to(device)

    @property
    def phases(self) -> list[Phase]:
        # (whole: MA-GP's second-order backward reaches D's weights outside D's modules, Phase.whole)
        whole = self.config.family_options.ma_gp > 0
        after = self.copy_text_encoder if self.config.family_options.text_encoder == "joint" else None
        return [Phase("D", trains="d", loss=self.d_loss, repeat=self.config.loss.d_steps, after=after, whole=whole),
                Phase("G", trains="g", frozen=("d",), loss=self.g_loss, reals="last")]  # the captions D just saw

    def draw(self, n: int, device) -> tuple:
        """(latents, None) of n fresh samples, from this rank's generator."""
        return torch.randn(n, self.config.model.z_dim, device=device), None

    def sentences(self, step, real: dict, train_d: bool = False) -> torch.Tensor:
        """The batch's captions' sentence embeddings: D's encoder (joint; trained when train_d), or the frozen
        one (no graph)."""
        from bigan.data.stream import DataError

        if real.get("caption") is None:
            raise DataError("a batch came without captions: model.arch=dfgan trains on captioned shards")
        if self.frozen_text is not None:
            return encode_with(self.frozen_text, self.tokenizer, real["caption"], step.device)
        ids, mask = (x.to(step.device) for x in self.tokenizer.encode(real["caption"]))
        if train_d:  # (MA-GP differentiates in an alias of them: ZeRO hangs hooks on what an engine's forward
            return step.train("d")(ids=ids, mask=mask).view(-1, self.config.family_options.cond_dim)  # returns)
        with torch.no_grad():
            return step.frozen("d")(ids=ids, mask=mask)

    def d_loss(self, step, real: dict):
        """Hinge on real/matching, fake and real/mismatched pairs; MA-GP on the real pairs, in the image and in
        the sentence (the encoder's output for the batch's captions)."""
        o = self.config.family_options
        regularize = o.ma_gp > 0
        sentences = self.sentences(step, real, train_d=True)
        if self.frozen_text is not None:  # a leaf MA-GP differentiates in
            sentences = sentences.requires_grad_(regularize)
        image = real["image"].detach().requires_grad_(True) if regularize else real["image"]
        real_logits, mismatched_logits = (step.penalty("d") if regularize else step.train("d"))(
            image, sentences, mismatched=True)
        z, _ = self.draw(len(image), step.device)
        with torch.no_grad():
            fake = step.fixed("g")(z, sentences.detach())
        fake_logits = step.train("d")(fake, sentences)
        loss, stats = dfgan.d_loss(real_logits, fake_logits, mismatched_logits)
        if regularize:
            penalty, penalty_stats = dfgan.ma_gp(image, sentences, real_logits, o.ma_gp, o.ma_gp_power)
            loss, stats = loss + penalty, {**stats, **penalty_stats}
        return loss, stats

    def copy_text_encoder(self, step):
        """After each D step, G's copy of the text encoder takes its new weights (every rank alike)."""
        with step.backend.gathered("d") as d:
            step.frozen("g").copy_text_encoder(d.text)

    def g_loss(self, step, real: dict):
        sentences = self.sentences(step, real)
        z, _ = self.draw(len(sentences), step.device)
        d = step.frozen("d")
        return losses.g_loss("hinge", d(step.train("g")(z, sentences), sentences))

    # -- grids: fixed held-out prompts, one row each, their texts beside the grid
    def grid_inputs(self, device):
        prompts = self.prompts_of_data(min(GRID_PROMPTS, self.config.run.grid_size))
        per_prompt = max(self.config.run.grid_size // len(prompts), 1)
        z = torch.randn(len(prompts) * per_prompt, self.config.model.z_dim,
                        generator=torch.Generator().manual_seed(self.config.train.seed))
        return z.to(device), prompts

    def prompts_of_data(self, n: int) -> list[str]:
        """The demo's held-out prompts (captions of attribute combinations never trained on) when training on
        demo_captions, else the first n captions of data.shards."""
        if "demo_captions" in self.config.data.shards.split("::"):
            from bigan.data.captions import held_out_items

            return [text for _, _, text in held_out_items(n)]
        from bigan.data.stream import _caption, read_shard, resolve_shards

        found = []
        for url in resolve_shards(self.config.data.shards).urls:
            found += [t for t in map(_caption, read_shard(url)) if t is not None][:n - len(found)]
            if len(found) == n:
                break
        return found

    def grid(self, g, inputs) -> tuple:
        z, prompts = inputs
        per_prompt = len(z) // len(prompts)
        sentences = g.encode(prompts).repeat_interleave(per_prompt, 0)
        images = g(z, sentences.to(z.dtype)).float()
        images.texts = [f"row {i + 1}: {prompt}" for i, prompt in enumerate(prompts)]  # (bigan.tracking logs them)
        return images, per_prompt

    # -- evaluation
    def evaluate(self, g, data, extractor, classifier, accelerator, n: int, wanted, seed: int = 0,
                 batch: int = 64) -> dict:
        from bigan.families.text2image_eval import caption_fid, prompted_scores

        result = {"n": n}
        if {"attr", "rprec", "clip"} & set(wanted):
            result.update(prompted_scores(self, g, accelerator, n, seed, batch, wanted))
        features = [m for m in wanted if m in ("fid", "kid")]
        if features:
            result.update(caption_fid(self, g, data, extractor, accelerator, n, features, seed, batch))
        return result

    def prepare_metrics(self, wanted, accelerator):
        """The CLIP model of the clip metric, loaded now: a folder that is no CLIP model fails at start-up."""
        from bigan.families.text2image_metrics import clip_model

        if "clip" in wanted:
            clip_model(self.config.family_options.clip, "dfgan.clip")

    # -- bigan-sample: prompts in, pictures out
    def prompts(self, args) -> list[str]:
        from bigan.sample import SampleError

        if args.prompts is not None:
            try:
                lines = args.prompts.read_text().splitlines()
            except OSError as exc:
                raise SampleError(f"--prompts: cannot read {args.prompts} ({exc.strerror})") from None
            prompts = [line.strip() for line in lines if line.strip()]
            if not prompts:
                raise SampleError(f"--prompts: {args.prompts} holds no prompt (one per line)")
            return prompts
        return [args.prompt]  # (bigan.sample refuses neither --prompt nor --prompts)

    def planned_names(self, args) -> list:
        """NNN_prompt_SSS.png: prompt NNN's sample SSS (with --prompt-to, --prompt's)."""
        return [f"{i:03d}_{_slug(p)}_{s:03d}.png" for i, p in enumerate(self.prompts(args)) for s in range(args.n)]

    def sample(self, g, args, device) -> Samples:
        """--n images per prompt (rows of a grid); --interpolate STEPS: rows walking from --prompt to
        --prompt-to (the sentence embeddings, linearly; one latent per row), or between two latents for
        each prompt; unknown words are named in a warning."""
        from bigan.sample import generate, latents, slerp

        prompts = [args.prompt, args.prompt_to] if args.prompt_to is not None else self.prompts(args)
        self.warn_unknown(prompts)
        g = g.to(device)
        sentences = g.encode(prompts).cpu()
        z_dim, seed, steps = self.config.model.z_dim, args.seed or 0, args.interpolate
        if args.prompt_to is not None:  # (bigan.sample checked that --interpolate is given)
            rows = args.n // steps
            t = torch.linspace(0, 1, steps)[None, :, None]
            s = torch.lerp(sentences[0], sentences[1], t).expand(rows, -1, -1).reshape(-1, sentences.shape[1])
            z = latents(rows, z_dim, seed, args.truncation).repeat_interleave(steps, 0)
            note = f"{rows} rows of {steps} steps from {args.prompt!r} to {args.prompt_to!r}"
        elif steps:
            rows = args.n // steps
            ends = latents(2 * rows * len(prompts), z_dim, seed, args.truncation).view(-1, 2, z_dim)
            z = slerp(ends[:, :1], ends[:, 1:], torch.linspace(0, 1, steps)[None, :, None]).reshape(-1, z_dim)
            s = sentences.repeat_interleave(rows * steps, 0)
            note = f"{rows} latent walks of {steps} steps per prompt"
        else:
            z = latents(args.n * len(prompts), z_dim, seed, args.truncation)
            s = sentences.repeat_interleave(args.n, 0)
            note = f"{args.n} images of each of {len(prompts)} prompt{'s' if len(prompts) > 1 else ''}"
        images = generate(g, 0, z, labels=s, device=device)  # (G's second input: the sentences)
        columns = steps or (args.n if len(prompts) > 1 else None)  # a row per prompt; one prompt: a square grid
        return Samples(images, names=self.planned_names(args), columns=columns, note=note)

    def warn_unknown(self, prompts: list[str]):
        if self.tokenizer is None:  # (a Hugging Face tokenizer splits what it does not know into pieces)
            return
        unknown = sorted({w for p in prompts for w in words(p) if self.tokenizer.encode(w)[0][0, 1] == UNK})
        if unknown:
            print(f"bigan-sample: warning: not in the training captions' vocabulary, read as unknown: "
                  f"{', '.join(unknown)}", file=sys.stderr)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"
