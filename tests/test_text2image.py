"""Text-to-image (model.arch=dfgan) through bigan's own entry points: training on the captioned demo with its
evaluation, exact resume, prompts in bigan-sample, the config's refusals, MA-GP and the mismatched pairs.
(The networks, tokenizer, encoders and classifier alone: test_text_parts.py.)"""
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from bigan import checkpoint
from bigan.config import ConfigError, load_config
from bigan.data import captions as C
from bigan.models import dfgan
from bigan.models.text import words
from conftest import HELPERS, free_port, run, tiny_args, zero3_partitioned
from test_trainer import _assert_close, _events, assert_same_checkpoint

TINY = {"model.arch": "dfgan", "dfgan.text_encoder": "joint", "data.shards": "demo_captions", "data.demo_images": 96,
        "data.workers": 1,
        "dfgan.cond_dim": 16, "dfgan.text_width": 16, "dfgan.text_heads": 2, "dfgan.text_depth": 1,
        "train.ema_kimg": 0.01, "train.g_betas": "[0.0,0.9]", "train.d_betas": "[0.0,0.9]"}


@pytest.fixture(scope="module")
def attributes_file(tmp_path_factory):
    """A barely trained attribute classifier: the attr metric's plumbing, in seconds (its quality: test_text_parts)."""
    path = tmp_path_factory.mktemp("attributes") / "attributes.pt"
    C.train_attribute_classifier(n=32, resolution=32, steps=2).save(str(path))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env, attributes_file, small_extractor):
    """2N iterations straight, and N then a resume for N more, each evaluated (attr, fid) at N and 2N; in one
    process (bigan.train.main three times: torch imported once)."""
    root = tmp_path_factory.mktemp("dfgan")
    common = {**TINY, "eval.every_kimg": 0.024, "eval.n": 16, "eval.metrics": "attr,fid",
              "eval.extractor": small_extractor, "dfgan.attributes": attributes_file}
    straight = tiny_args("demo_captions", root / "straight", **common, **{"train.kimg": 0.048})
    first = tiny_args("demo_captions", root / "split", **common, **{"train.kimg": 0.024})
    resumed = tiny_args("demo_captions", root / "split", **common, **{"train.kimg": 0.048, "run.resume": "latest"})
    result = run([sys.executable, str(HELPERS / "train_runs.py"), *straight, "--", *first, "--", *resumed], env)
    assert "resuming from" in result.stdout
    return root


def test_trains_on_captions_evaluates_and_resumes_bit_for_bit(runs):
    """Weights (G's copy of the text encoder too), optimizers, EMA, counters, RNG and stream; the D and G
    phases' terms and the evaluation logged, with the held-out prompts beside the grids."""
    a, b = (checkpoint.checkpoints(runs / name)[-1] for name in ("straight", "split"))
    assert a.name == b.name == "ckpt-000000006"
    assert_same_checkpoint(a, b, checkpoint.states(a).values())
    g, d = load_file(str(a / "model.safetensors")), load_file(str(a / "model_1.safetensors"))
    encoder = {k: v for k, v in d.items() if k.startswith("text.")}
    assert encoder and all(torch.equal(g[k], v) for k, v in encoder.items()), "G holds D's text encoder as trained"
    events = _events(runs / "straight")
    scalars = events.Tags()["scalars"]
    for tag in ("Loss/D_mismatched", "Loss/D_fake", "Penalty/MA-GP", "Loss/G", "Metrics/attr_acc",
                "Metrics/attr_acc_held_out", "Metrics/attr_acc_real", "Metrics/fid"):
        assert tag in scalars, tag
    assert all(0 <= e.value <= 1 for e in events.Scalars("Metrics/attr_acc_held_out"))
    assert "samples/G_ema/prompts/text_summary" in events.Tags()["tensors"]
    shown = sorted((runs / "straight" / "samples").glob("samples_G_ema_*.txt"))[0].read_text().splitlines()
    held_out = [text for _, _, text in C.held_out_items(4)]
    assert shown == [f"row {i + 1}: {text}" for i, text in enumerate(held_out)]


def test_the_attr_classifier_is_trained_on_first_use_and_cached(tmp_path, monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from bigan.families import text2image_eval

    monkeypatch.setenv("BIGAN_CACHE", str(tmp_path))
    monkeypatch.setattr(text2image_eval, "CLASSIFIER", {"n": 16, "resolution": 32, "steps": 1})
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, process_index=0,
                                  main_process_first=nullcontext)
    with torch.no_grad():  # (as an evaluation calls it)
        classifier = text2image_eval.attribute_classifier("", accelerator)
    cached = list((tmp_path / "attributes").iterdir())
    assert [p.name for p in cached] == ["classifier-16-32px-1.pt"]
    again = text2image_eval.attribute_classifier("", accelerator)
    images, _ = C.render_captioned_batch(0, range(2), 32)
    assert torch.equal(classifier(images)["style"], again(images)["style"])
    assert cached[0].stat().st_mtime == list((tmp_path / "attributes").iterdir())[0].stat().st_mtime


def test_config_records_the_vocabulary_the_tokenizer_was_built_from(runs):
    """The training captions' words, most frequent first, in architecture.json (bigan-sample rebuilds the
    tokenizer from it) and config.yaml (a resume reads it)."""
    import yaml
    from collections import Counter

    counts = Counter(w for _, _, text in C.training_items(96) for w in words(text))
    saved = json.loads((checkpoint.checkpoints(runs / "straight")[-1] / "architecture.json").read_text())
    vocabulary = saved["dfgan.vocabulary"].split(" ")
    assert vocabulary == sorted(counts, key=lambda w: (-counts[w], w))
    assert yaml.safe_load((runs / "straight" / "config.yaml").read_text())["dfgan"]["vocabulary"] == " ".join(vocabulary)
    assert "dfgan.ma_gp" not in saved and "dfgan.attributes" not in saved  # (not shapes: a resume may change them)


def _sample(*args):
    from bigan.sample import main

    return main(list(map(str, args)))


def test_prompts_in_pictures_out(runs, tmp_path, capsys):
    """--prompt (a grid), --prompts (a folder: one PNG per prompt and sample; a grid: one row per prompt),
    interpolation between two prompts and latent walks, from the run dir, a checkpoint and the export."""
    import numpy as np
    from PIL import Image

    run_dir = runs / "straight"
    assert _sample("--checkpoint", run_dir, "--prompt", "a red sun over still water", "--n", 16,
                   "--out", tmp_path / "grid.png") == 0
    assert Image.open(tmp_path / "grid.png").size == (4 * 32, 4 * 32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red sun over still water\n\nthree ridges under a white moon, no trees\n")
    latest = checkpoint.checkpoints(run_dir)[-1]
    assert _sample("--checkpoint", latest, "--prompts", prompts, "--n", 2, "--out", f"{tmp_path / 'pictures'}/") == 0
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "000_a-red-sun-over-still-water_000.png", "000_a-red-sun-over-still-water_001.png",
        "001_three-ridges-under-a-white-moon-no-trees_000.png", "001_three-ridges-under-a-white-moon-no-trees_001.png"]
    assert _sample("--checkpoint", run_dir, "--prompts", prompts, "--n", 3, "--out", tmp_path / "rows.png") == 0
    assert Image.open(tmp_path / "rows.png").size == (3 * 32, 2 * 32)
    assert _sample("--checkpoint", run_dir, "--prompt", "a red sun", "--prompt-to", "a white moon",
                   "--interpolate", 4, "--n", 8, "--out", tmp_path / "walk.npz") == 0
    walk = np.load(tmp_path / "walk.npz")["images"].astype(float)
    assert walk.shape == (8, 32, 32, 3)
    ends = {}
    for prompt in ("a red sun", "a white moon"):  # each row starts at the first prompt and ends at the second
        assert _sample("--checkpoint", run_dir, "--prompt", prompt, "--n", 2, "--out", tmp_path / f"{prompt}.npz") == 0
        ends[prompt] = np.load(tmp_path / f"{prompt}.npz")["images"].astype(float)
    for row in range(2):
        assert np.abs(walk[4 * row] - ends["a red sun"][row]).mean() < 0.5
        assert np.abs(walk[4 * row + 3] - ends["a white moon"][row]).mean() < 0.5
    assert np.abs(walk[0] - walk[4]).mean() > 0.5  # a latent per row (the text's effect on a 6-step G is tiny)
    export = run_dir / "export" / "generator_ema.safetensors"
    assert _sample("--checkpoint", export, "--prompt", "a red sun", "--interpolate", 4, "--n", 8,
                   "--out", tmp_path / "latent_walk.png") == 0
    assert Image.open(tmp_path / "latent_walk.png").size == (4 * 32, 2 * 32)
    # the same prompt and seed: the same pictures, from the export as from the run dir
    for source, out in ((run_dir, "a.npz"), (export, "b.npz")):
        assert _sample("--checkpoint", source, "--prompt", "a white moon", "--n", 2, "--out", tmp_path / out) == 0
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    capsys.readouterr()


def test_unknown_words_are_named_and_other_families_refuse_prompt_flags(runs, tmp_path, capsys):
    from bigan import families
    from bigan.config import config_from_dict

    run_dir = runs / "straight"
    assert _sample("--checkpoint", run_dir, "--prompt", "a zebra sun over purple water", "--n", 1,
                   "--out", tmp_path / "x.png") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bigan-sample: warning: not in the training captions' vocabulary, read as unknown: purple, zebra"]
    for flags in (["--prompt", "x", "--input", tmp_path], []):
        assert _sample("--checkpoint", run_dir, *flags, "--out", tmp_path / "y.png") == 2
    with pytest.raises(SystemExit):  # (argparse: exit 2)
        _sample("--checkpoint", run_dir, "--prompt", "x", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "y.png")
    assert _sample("--checkpoint", run_dir, "--prompts", tmp_path / "missing.txt", "--out", tmp_path / "y.png") == 2
    err = capsys.readouterr().err
    assert "--input does not apply to model.arch=dfgan" in err and "--prompt TEXT or --prompts FILE" in err
    assert "--prompts: cannot read" in err
    dcgan = families.build(config_from_dict({"model": {"arch": "dcgan", "g_channels": 4, "z_dim": 8},
                                             "data": {"resolution": 32}}))
    g = dcgan.build_generator()
    checkpoint.export_generator(tmp_path / "dcgan", g, None, {"arch": "dcgan", "g_channels": 4, "z_dim": 8},
                                {"resolution": 32, "architecture": dcgan.architecture()})
    for flags in (["--prompt", "a red sun"], ["--prompts", tmp_path / "p.txt"]):
        (tmp_path / "p.txt").write_text("a red sun\n")
        assert _sample("--checkpoint", tmp_path / "dcgan" / "generator.safetensors", *flags,
                       "--out", tmp_path / "z.png") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bigan-sample: error: {flags[0]} does not apply to model.arch=dcgan") and "\n" not in err


@pytest.mark.parametrize("override, key", [
    ("--augment.kind=diffaugment", "augment.kind"), ("--data.shards=demo", "data.shards"),
    ("--loss.r1=1", "loss.r1"), ("--loss.name=bce", "loss.name"), ("--model.num_classes=3", "model.num_classes"),
    ("--train.batch_size=1", "train.batch_size"), ("--dfgan.text_heads=3", "dfgan.text_heads"),
    ("--eval.metrics=is", "eval.metrics"), ("--dfgan.attributes=/no/such.pt", "dfgan.attributes"),
])
def test_settings_it_cannot_train_with_are_refused_naming_the_key(override, key):
    defaults = load_config(None, ["--model.arch=dfgan"])  # DF-GAN's, on the captioned demo
    assert (defaults.loss.name, defaults.loss.r1, defaults.data.shards) == ("hinge", 0, "demo_captions")
    base = ["--model.arch=dfgan"]
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*base, override])


@pytest.mark.parametrize("vocabulary", ["", "a red sun"])  # (given, no caption is read to build the tokenizer)
def test_shards_without_captions_are_refused_at_start_up(vocabulary, tiny_shards, tmp_path, capsys):
    from bigan.train import main

    args = {**TINY, "data.shards": tiny_shards, **({"dfgan.vocabulary": vocabulary} if vocabulary else {})}
    assert main(tiny_args(tiny_shards, tmp_path / "run", **args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigan: error: data.shards: model.arch=dfgan trains on captioned images") and "\n" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the D phase's terms, on hand-made batches


def _family(batch_size=4):
    from bigan import families

    items = list(C.training_items(8))
    vocabulary = sorted({w for _, _, text in items for w in words(text)})
    config = load_config(None, [f"--{k}={v}" for k, v in {**TINY, "data.resolution": 32, "model.z_dim": 8,
                                                           "model.g_channels": 4, "model.d_channels": 4,
                                                           "train.batch_size": batch_size,
                                                           "dfgan.vocabulary": " ".join(vocabulary)}.items()])
    family = families.build(config)
    torch.manual_seed(0)
    networks = family.networks()
    images, _ = C.render_captioned_batch(0, [i for i, _, _ in items[:batch_size]], 32)
    batch = {"image": images.float() / 127.5 - 1, "caption": [text for _, _, text in items[:batch_size]]}
    return family, networks["g"].module, networks["d"].module, batch


def test_mismatched_negatives_are_the_captions_rolled_by_one():
    family, _, d, batch = _family()
    ids, mask = family.tokenizer.encode(batch["caption"])
    sentences = d(ids=ids, mask=mask)
    real_logits, mismatched_logits = d(batch["image"], sentences, mismatched=True)
    rolled = batch["caption"][-1:] + batch["caption"][:-1]  # image i with caption i - 1
    rolled_sentences = d.text(*family.tokenizer.encode(rolled))[0]
    torch.testing.assert_close(mismatched_logits, d(batch["image"], rolled_sentences), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(real_logits, d(batch["image"], sentences))
    assert not torch.allclose(mismatched_logits, real_logits)


def test_ma_gp_differentiates_in_the_sentence_too():
    """MA-GP = w * mean((|grad_x D|^2 + |grad_s D|^2)^(p/2)) on real pairs: the text part is in it, and the
    penalty trains D's text-reading weights (double backward)."""
    family, _, d, batch = _family()
    for block in d.discriminator.blocks:  # past the start, where every residual gain is still 0
        block.gain.data.fill_(0.5)
    ids, mask = family.tokenizer.encode(batch["caption"])
    image = batch["image"].requires_grad_(True)
    sentences = d(ids=ids, mask=mask)
    real_logits = d(image, sentences)
    penalty, _ = dfgan.ma_gp(image, sentences, real_logits, weight=2.0, power=6.0)
    grad_x, grad_s = torch.autograd.grad(real_logits.sum(), (image, sentences), retain_graph=True)
    squared_x, squared_s = grad_x.flatten(1).square().sum(1), grad_s.square().sum(1)
    assert (squared_s > 0).all()
    torch.testing.assert_close(penalty, 2.0 * (squared_x + squared_s).pow(3).mean())
    assert penalty > 2.0 * squared_x.pow(3).mean() * 1.01  # the sentence's part is not negligible here
    penalty.backward()
    head = d.discriminator.head[0].weight  # its input channels past the image features read the sentence
    assert head.grad[:, -sentences.shape[1]:].abs().sum() > 0


def test_g_copies_the_text_encoder_after_each_d_step_and_encodes_prompts_with_it():
    from contextlib import nullcontext
    from types import SimpleNamespace

    family, g, d, batch = _family()
    modules = {"g": g, "d": d}
    backend = SimpleNamespace(gathered=lambda name: nullcontext(modules[name]))
    step = SimpleNamespace(device=torch.device("cpu"), train=modules.get, penalty=modules.get, fixed=modules.get,
                           frozen=modules.get, backend=backend)
    loss, stats = family.d_loss(step, batch)
    loss.backward()
    assert {"Loss/D_mismatched", "Penalty/MA-GP"} <= set(stats)
    assert all(p.grad is not None for p in d.text.parameters()), "D's optimizer trains the text encoder"
    with torch.no_grad():
        for p in d.text.parameters():
            p.add_(0.01)
    family.copy_text_encoder(step)
    encoded = d.text(*family.tokenizer.encode(batch["caption"]))[0]
    torch.testing.assert_close(g.encode(batch["caption"]), encoded, atol=1e-5, rtol=1e-4)
    assert not any(name.startswith("text.") for name, _ in g.named_parameters()), "no optimizer steps G's copy"


def _equivalence(tmp_path, env, launcher, common=(), split_env=None, **extra):
    """(one process on the batch of 8, `launcher` on 2 ranks x 4, initial parameters) after three iterations of
    tests/helpers/step_equivalence.py (captions repeat every 4 samples, or 2 for a split into micro-batches of 2:
    the mismatched pairs are the same on both splits); `common`: settings of both, `extra`: of the split run."""
    vocabulary = sorted({w for text in ("a red sun over still water", "three ridges under a white moon",
                                        "a meadow at dusk, no trees", "a golden sun above two ridges, woods")
                         for w in words(text)})
    settings = {**TINY, "data.resolution": 32, "model.z_dim": 8, "model.g_channels": 4, "model.d_channels": 4,
                "dfgan.vocabulary": " ".join(vocabulary), "train.adam_eps": 1.0, "train.g_lr": 0.01,
                "train.d_lr": 0.01, "run.dir": tmp_path / "r", **dict(common)}
    base = [f"--{k}={v}" for k, v in settings.items()]
    helper = str(HELPERS / "step_equivalence.py")
    # (captions repeat with a period that divides the split's micro-batch, in both runs: see the helper)
    period = {"BIGAN_TEST_CAPTION_PERIOD": str(math.gcd(4, int(extra.get("train.batch_size", 4))))}
    env, split_env = {**env, **period}, {**(split_env or env), **period}
    run([sys.executable, helper, str(tmp_path / "big.pt"), *base, "--train.batch_size=8"], env)
    reference, initial = torch.load(tmp_path / "big.pt"), torch.load(tmp_path / "initial.pt")
    extra = [f"--{k}={v}" for k, v in extra.items()]
    run([*launcher, helper, str(tmp_path / "split.pt"), *base, "--train.batch_size=4", *extra], split_env)
    return reference, torch.load(tmp_path / "split.pt"), initial


def test_two_ddp_ranks_equal_one_big_batch(tmp_path, env):
    """The text encoder in D's DDP forward, MA-GP's double backward through DDP, G's copy of the encoder."""
    reference, split, initial = _equivalence(tmp_path, env, [sys.executable, "-m", "torch.distributed.run",
                                                              "--nproc_per_node=2", f"--master_port={free_port()}"])
    moved = [k for k in initial if not torch.equal(reference[k], initial[k])]
    assert any(k.startswith("D.text.") for k in moved) and any(k.startswith("G.generator.") for k in moved)
    assert all(torch.equal(reference[f"G.{k[2:]}"], reference[k]) for k in reference if k.startswith("D.text."))
    _assert_close(reference, split, initial)


def test_zero3_g_and_d_equal_one_big_batch(tmp_path, env):
    """G's and D's weights partitioned (ZeRO-3, every weight: no persistence threshold), MA-GP's double backward
    through D's inner module with D's weights held whole for the phase (Phase.whole; without it its second-order
    gradients meet D's released weights), over accumulated micro-batches (begin_micro_batch)."""
    pytest.importorskip("deepspeed")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              "launch_configs/accelerate/deepspeed_zero3.yaml", "--num_processes", "2",
              "--main_process_port", str(free_port())]
    reference, split, initial = _equivalence(tmp_path, env, launch,  # (2 ranks x 2 accumulated micro-batches of 2)
                                             **{"train.deepspeed": zero3_partitioned(tmp_path),
                                                "train.batch_size": 2, "train.grad_accum": 2})
    # (ZeRO reduces D's gradients in another order: a gain that starts at 0 differs by 1e-5 of its ~1e-6)
    _assert_close(reference, split, initial, rtol=1e-4)
