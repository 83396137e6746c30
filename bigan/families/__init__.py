"""The registry of GAN families: model.arch -> the family's class (bigan.families.base.Family).

Adding a family is its own module plus one line here; ``model.arch=package.module:Class`` names a
family of one's own without touching bigan at all.
"""
from __future__ import annotations

import importlib

FAMILIES = {  # name -> "module:Class", imported on first use
    "dcgan": "bigan.families.dcgan:DCGAN",
    "resnet": "bigan.families.resnet:ResNet",
    "pix2pix": "bigan.families.pix2pix:Pix2Pix",
    "stylegan2": "bigan.families.stylegan2:StyleGAN2",
    "dfgan": "bigan.families.text2image:DFGAN",
}


class UnknownFamily(ValueError):
    pass


def get(arch: str):
    """The family class of a model.arch value: a registered name, or an import path module:Class."""
    where = FAMILIES.get(arch, arch)
    module_name, sep, attribute = where.partition(":")
    if not sep:
        raise UnknownFamily(f"must be one of {', '.join(FAMILIES)}, got {arch!r} (or a family of your own, as "
                            f"package.module:Class)")
    try:
        family = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UnknownFamily(f"cannot load the family {arch!r} ({type(exc).__name__}: {exc})") from None
    from bigan.families.base import Family

    if not (isinstance(family, type) and issubclass(family, Family)):
        raise UnknownFamily(f"{arch!r} is not a bigan.families.base.Family subclass")
    return family


def build(config):
    """The family instance for a config."""
    return get(config.model.arch)(config)


def data_free_metrics() -> set:
    """Metrics some registered family measures without reference shards (bigan-eval --data)."""
    return {m for name in FAMILIES for m in get(name).data_free_metrics}


def known_metrics() -> list:
    """Every metric some registered family measures, in a stable order."""
    found = []
    for name in FAMILIES:
        found += [m for m in get(name).metrics if m not in found]
    return found
