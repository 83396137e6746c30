"""Captions for the demo landscapes: each scene's attributes, read off the renderer's own draws, in words.

A captioned scene is the demo renderer's scene with two more choices, drawn from a stream of
their own so that every other draw stays as in the demo set: a moonlit night in any palette
(the demo set shows a moon only in the nocturne palette), and bare dry ground (the demo set
always puts trees on dry ground). Its attributes:

    style      palette name (hiroshige, monet, ...)
    celestial  "sun" or "moon"
    colour     the disc's colour name, from the palette's disc colour ("red" for hiroshige's sun)
    time       time of day, from the palette (TIME_OF_DAY), "night" under a moon
    ridges     mountain ridges drawn, 2-4 (in about a third of the scenes a nearer ridge or the lake
               hides one, so fewer show: the attribute the classifier reads least well)
    water      a lake or not
    trees      trees or not

Captions come from templates with several word orders, synonyms for every value and optional
parts, chosen by a seeded RNG: "a red sun over still water in the hiroshige style",
"hiroshige-style landscape at dawn: three ridges, a lake, no trees". No caption says left or
right, so a horizontal flip keeps an image and its caption matched. Some attribute
combinations (HELD_OUT) never appear in the training items and make up the held-out prompts,
to measure whether a text-to-image model composes what it learned apart.

This module also holds the attribute classifier that scores text-to-image samples: a small
CNN with one head per drawn attribute, trained on captioned renders and saved as TorchScript.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bigan.data.demo import HELD_OUT_SEED, PALETTES, render_scene

# palette -> time of day under its sun; every palette reads as night under a moon
TIME_OF_DAY = {"hiroshige": "dawn", "monet": "morning", "alpine": "midday", "turner": "midday",
               "hudson_river": "afternoon", "autumn": "afternoon", "sunset": "dusk", "nocturne": "night"}
MOONLIT_SHARE = 0.25      # captioned scenes of the other palettes drawn by night
BARE_GROUND_SHARE = 0.5   # captioned scenes on dry ground drawn without trees
_VARIANT_STREAM, _CAPTION_STREAM = 1, 2  # RNG streams of a scene's (seed, index), apart from the renderer's


@dataclass(frozen=True)
class SceneAttributes:
    style: str
    celestial: str
    colour: str
    time: str
    ridges: int
    water: bool
    trees: bool

    @classmethod
    def from_drawn(cls, drawn: dict) -> "SceneAttributes":
        """Name what the renderer reports it drew (render_scene(..., with_attributes=True))."""
        moon = drawn["celestial"] == "moon"
        disc = PALETTES["nocturne" if moon else drawn["style"]][6]
        return cls(drawn["style"], drawn["celestial"], colour_name(disc),
                   "night" if moon else TIME_OF_DAY[drawn["style"]], int(drawn["ridges"]),
                   bool(drawn["water"]), bool(drawn["trees"]))

    def as_dict(self) -> dict:
        return asdict(self)


def colour_name(hex_colour: str) -> str:
    """A disc colour's name: white when unsaturated, else red, golden or pale yellow by green/red."""
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    if max(r, g, b) - min(r, g, b) < 0.15:
        return "white"
    return "red" if g / r < 0.5 else "golden" if g / r < 0.9 else "pale yellow"


def _variant(seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, index, _VARIANT_STREAM])
    return {"moonlit": bool(rng.random() < MOONLIT_SHARE), "trees_on_ground": bool(rng.random() >= BARE_GROUND_SHARE)}


def render_captioned(seed: int, index: int, resolution: int = 64) -> tuple[np.ndarray, SceneAttributes]:
    """(painting uint8 (resolution, resolution, 3), attributes) of one captioned scene."""
    _, painting, drawn = render_scene(seed, index, resolution, with_attributes=True, **_variant(seed, index))
    return painting, SceneAttributes.from_drawn(drawn)


def scene_attributes(seed: int, index: int) -> SceneAttributes:
    """A captioned scene's attributes without its full-size painting (they do not depend on resolution)."""
    return render_captioned(seed, index, resolution=8)[1]


# ---------------------------------------------------------------- words

STYLE_WORDS = {"hudson_river": ["hudson river school", "hudson river"], "hiroshige": ["hiroshige", "ukiyo-e"],
               "monet": ["monet", "impressionist"], "turner": ["turner"], "nocturne": ["nocturne", "whistler"],
               "sunset": ["sunset"], "autumn": ["autumn"], "alpine": ["alpine"]}
COLOUR_WORDS = {"red": ["red", "crimson", "scarlet"], "golden": ["golden", "amber", "orange"],
                "pale yellow": ["pale yellow", "yellow", "soft yellow"], "white": ["white", "silver", "pale"]}
TIME_WORDS = {"dawn": ["at dawn", "at daybreak"], "morning": ["in the morning", "early in the morning"],
              "midday": ["at midday", "at noon"], "afternoon": ["in the afternoon", "late in the afternoon"],
              "dusk": ["at dusk", "at twilight", "in the evening"], "night": ["at night", "by night"]}
RIDGE_WORDS = {n: [f"{word} ridges", f"{word} mountain ridges", f"{word} layers of hills"]
               for n, word in ((2, "two"), (3, "three"), (4, "four"))}
RIDGE_WORDS[2].append("a pair of ridges")
WATER_WORDS = {True: ["still water", "a lake", "a calm lake", "reflecting water"],
               False: ["dry land", "open ground", "a meadow"]}
TREE_WORDS = {True: ["trees", "a few trees", "a stand of trees", "woods"],
              False: ["no trees", "not a single tree", "treeless"]}

# [...] is an optional part, kept or dropped at random; TAGS is a shuffled list of some attributes
TEMPLATES = (
    "{disc} over {water}[ {time}] in the {style} style",
    "{style}-style landscape[ {time}]: {ridges}, {water}, {trees}",
    "{ridges} under {disc}[, {trees}][, {water}]",
    "a {style} painting of {ridges}[ {time}][ and {water}]",
    "{time} in the mountains: {disc}, {water}[ and {trees}]",
    "{water}, {trees} and {ridges} beneath {disc}[, after {style}]",
    "{disc} above {ridges}[, {style}]",
    "TAGS",
)
_OPTIONAL = re.compile(r"\[([^\]]*)\]")


def _disc_phrase(attributes: SceneAttributes, rng) -> str:
    words = [attributes.celestial]
    if rng.random() < 0.75:
        words.insert(0, rng.choice(COLOUR_WORDS[attributes.colour]))
    article = "the" if rng.random() < 0.3 else "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _phrases(attributes: SceneAttributes, rng) -> dict:
    return {"style": rng.choice(STYLE_WORDS[attributes.style]), "disc": _disc_phrase(attributes, rng),
            "time": rng.choice(TIME_WORDS[attributes.time]), "ridges": rng.choice(RIDGE_WORDS[attributes.ridges]),
            "water": rng.choice(WATER_WORDS[attributes.water]), "trees": rng.choice(TREE_WORDS[attributes.trees])}


def caption(attributes: SceneAttributes, rng: np.random.Generator) -> str:
    """One caption of the scene: a random template, random synonyms, random optional parts."""
    phrases = _phrases(attributes, rng)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if template == "TAGS":
        keys = [k for k in phrases if rng.random() < 0.7] or ["disc", "style"]
        return ", ".join(["landscape"] + [phrases[k] for k in rng.permutation(keys)])
    template = _OPTIONAL.sub(lambda m: m.group(1) if rng.random() < 0.5 else "", template)
    return template.format(**phrases)


_PHRASE_TABLES = {"style": STYLE_WORDS, "colour": COLOUR_WORDS, "time": TIME_WORDS, "ridges": RIDGE_WORDS,
                  "water": WATER_WORDS, "trees": TREE_WORDS, "celestial": {"sun": ["sun"], "moon": ["moon"]}}


def mentioned(text: str) -> dict:
    """{attribute: value} of the attributes a caption names (each phrase matched whole, longest first; an
    attribute named with two values is left out): what a picture drawn from this prompt should show."""
    text, found = text.lower(), {}
    for name, table in _PHRASE_TABLES.items():
        phrases = sorted(((p, v) for v, ps in table.items() for p in ps), key=lambda pv: -len(pv[0]))
        lookup = dict(phrases)
        pattern = r"(?<![\w-])(?:" + "|".join(re.escape(p) for p, _ in phrases) + r")(?![\w])"
        values = {lookup[m.group(0)] for m in re.finditer(pattern, text)}
        if len(values) == 1:
            found[name] = values.pop()
    return found


# ---------------------------------------------------------------- held-out combinations

HELD_OUT = (  # each: attribute values that never appear together in training (each appears apart)
    {"style": "hiroshige", "celestial": "moon", "water": True},
    {"style": "sunset", "water": False, "trees": False},
    {"style": "alpine", "ridges": 4, "trees": True},
    {"style": "monet", "celestial": "moon", "trees": True},
)


def is_held_out(attributes: SceneAttributes) -> bool:
    values = attributes.as_dict()
    return any(all(values[key] == value for key, value in combo.items()) for combo in HELD_OUT)


def _items(seed: int, n: int, held_out: bool):
    index = found = 0
    while found < n:
        if index > 1000 * (found + 1):  # held-out combinations are a few percent of scenes, not 1 in 1000
            kind = "held-out" if held_out else "training"
            raise ValueError(f"seed {seed}: no {kind} scene among 1000 in a row; does HELD_OUT name a "
                             "combination the renderer never draws?")
        attributes = scene_attributes(seed, index)
        if is_held_out(attributes) == held_out:
            yield index, attributes, caption(attributes, np.random.default_rng([seed, index, _CAPTION_STREAM]))
            found += 1
        index += 1


def training_items(n: int, seed: int = 0):
    """(index, attributes, caption) of the first n captioned scenes of `seed` outside HELD_OUT;
    the image is render_captioned(seed, index, resolution)[0]."""
    return _items(seed, n, held_out=False)


def held_out_items(n: int, seed: int = HELD_OUT_SEED):
    """(index, attributes, caption) of the first n captioned scenes of `seed` inside HELD_OUT: the
    held-out prompts (scenes of other seeds outside HELD_OUT: training_items(n, seed))."""
    return _items(seed, n, held_out=True)


# ---------------------------------------------------------------- attribute classifier

HEADS = {"style": tuple(sorted(PALETTES)), "celestial": ("sun", "moon"), "ridges": (2, 3, 4),
         "water": (False, True), "trees": (False, True)}  # colour and time follow from style and celestial
CLASSIFIER_SEED = 2_000_003  # renders the classifier learns from, apart from training and held-out sets


class AttributeClassifier(nn.Module):
    """uint8 NCHW images (any size; resized to `resolution`) -> {attribute: logits over HEADS[attribute]}.

    Stride-2 convs down to 8x8, one more to 4x4; the heads read the 4x4 map whole (where things
    are: the lake below, the ridges above) and the 8x8 map's maximum over positions (whether
    something small is anywhere: a tree; +16 points of tree accuracy at 32 px)."""

    def __init__(self, resolution: int = 32, width: int = 16):
        super().__init__()
        self.resolution = resolution
        layers, channels, size = [nn.Conv2d(3, width, 3, 1, 1), nn.LeakyReLU(0.2)], width, resolution
        while size > 8:
            layers += _down(channels, channels * 2)
            channels, size = channels * 2, size // 2
        self.local = nn.Sequential(*layers)
        self.whole = nn.Sequential(*_down(channels, channels * 2), nn.Flatten())
        self.joint = nn.Sequential(nn.Linear(channels * 2 * 16 + channels, 256), nn.LeakyReLU(0.2))
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        local = self.local(x)
        features = self.joint(torch.cat([self.whole(local), local.amax(dim=(2, 3))], dim=1))
        logits: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            logits[name] = head(features)
        return logits


def _down(a: int, b: int) -> list[nn.Module]:
    return [nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]


def render_captioned_batch(seed: int, indices, resolution: int) -> tuple[torch.Tensor, list[SceneAttributes]]:
    """Captioned scenes as uint8 NCHW and their attributes."""
    scenes = [render_captioned(seed, int(i), resolution) for i in indices]
    images = torch.from_numpy(np.stack([image for image, _ in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, [attributes for _, attributes in scenes]


def _targets(attributes: list[SceneAttributes]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(a, name)) for a in attributes]) for name, values in HEADS.items()}


@torch.enable_grad()  # (also when called under no_grad: an evaluation training it on first use)
def train_attribute_classifier(n: int = 1024, resolution: int = 32, steps: int = 300, seed: int = CLASSIFIER_SEED,
                               batch_size: int = 64, lr: float = 3e-3) -> torch.jit.ScriptModule:
    """Train an AttributeClassifier on n captioned renders of `seed` (all combinations, held-out ones
    too: it scores them), with random horizontal flips; returns it scripted, in eval mode (.save(path)).
    The caller's random state is left as it was."""
    from bigan.seeding import isolated

    with isolated():
        return _train_attribute_classifier(n, resolution, steps, seed, batch_size, lr)


def _train_attribute_classifier(n, resolution, steps, seed, batch_size, lr):
    torch.manual_seed(seed)
    images, attributes = render_captioned_batch(seed, range(n), resolution)
    targets = _targets(attributes)
    model = AttributeClassifier(resolution)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)  # warm up, anneal
    for _ in range(steps):
        batch = torch.randint(n, (batch_size,))
        x = images[batch]
        x = torch.where(torch.rand(batch_size, 1, 1, 1) < 0.5, x.flip(-1), x)  # captions never say left or right
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], targets[name][batch]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return torch.jit.script(model.eval())


def predict_attributes(classifier, images: torch.Tensor, batch_size: int = 256) -> list[SceneAttributes]:
    """What the classifier sees in uint8 NCHW images; colour and time follow from style and celestial."""
    with torch.no_grad():
        logits = [classifier(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    picks = {name: torch.cat([part[name] for part in logits]).argmax(1).tolist() for name in HEADS}
    return [SceneAttributes.from_drawn({name: HEADS[name][picks[name][i]] for name in HEADS})
            for i in range(len(images))]


def attribute_accuracy(classifier, images: torch.Tensor, attributes: list[SceneAttributes]) -> dict[str, float]:
    """Share of images whose attribute the classifier reads as `attributes` say, per attribute, and
    "all": every attribute right."""
    predicted = predict_attributes(classifier, images)
    names = [f.name for f in fields(SceneAttributes)]
    right = np.array([[getattr(p, k) == getattr(a, k) for k in names] for p, a in zip(predicted, attributes)])
    return {**{k: float(right[:, j].mean()) for j, k in enumerate(names)}, "all": float(right.all(1).mean())}
