"""Where model.arch=dfgan's sentences come from (dfgan.text_encoder): bigan's encoder pre-trained contrastively
before the GAN (once, cached, the same weights and the same G and D on every rank, frozen), and a frozen local
Hugging Face encoder that stays outside G's weights yet comes back in bigan-sample. (Trained with D, 'joint':
test_text2image.py.)"""
import copy
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from bigan import checkpoint, families
from bigan.config import ConfigError, load_config
from bigan.data import captions as C
from bigan.families.text2image_text import hf_encoder
from conftest import HELPERS, free_port, run, tiny_args
from test_text2image import TINY, _equivalence
from test_text_parts import _tiny_clip
from test_trainer import _assert_close, assert_same_checkpoint

CONTRASTIVE = {"dfgan.text_encoder": "contrastive", "dfgan.pretrain_images": 48, "dfgan.pretrain_steps": 30}


HF_TINY = {k: v for k, v in TINY.items() if k != "dfgan.cond_dim"}  # (a Hugging Face encoder sets it)


def _config(**overrides):
    base = TINY if overrides.get("dfgan.text_encoder", "joint") in ("joint", "contrastive") else HF_TINY
    settings = {**base, "data.resolution": 32, "model.z_dim": 8, "model.g_channels": 4, "model.d_channels": 4,
                "train.batch_size": 4, **overrides}
    return load_config(None, [f"--{k}={v}" for k, v in settings.items()])


def _step(g, d):
    modules = {"g": g, "d": d}
    return SimpleNamespace(device=torch.device("cpu"), train=modules.get, penalty=modules.get, fixed=modules.get,
                           frozen=modules.get, backend=SimpleNamespace(gathered=lambda name: nullcontext(modules[name])))


def _batch(n=4):
    items = list(C.training_items(n))
    images, _ = C.render_captioned_batch(0, [i for i, _, _ in items], 32)
    return {"image": images.float() / 127.5 - 1, "caption": [text for _, _, text in items]}


def test_contrastive_encoder_is_pretrained_once_frozen_and_leaves_the_ranks_alike(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BIGAN_CACHE", str(tmp_path))
    config = _config(**CONTRASTIVE)
    built = []
    for _ in range(2):  # the first pre-trains (rank 0), the second reads the cache (what the other ranks get)
        family = families.build(copy.deepcopy(config))
        torch.manual_seed(0)
        networks = family.networks()
        built.append((family, networks, torch.get_rng_state()))
    out = capsys.readouterr().out
    assert out.count("pre-training the text encoder contrastively on 48 images") == 1, out
    assert "text encoder pre-trained contrastively, from" in out
    assert len(list((tmp_path / "text_encoders").glob("contrastive-*.pt"))) == 1
    (family, networks, rng), (_, again, rng_again) = built
    assert torch.equal(rng, rng_again), "pre-training or not, the global RNG is where it was: G and D start alike"
    for name in ("g", "d"):
        first, second = networks[name].module.state_dict(), again[name].module.state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first), name
    g, d = networks["g"].module, networks["d"].module
    assert d.text is None and not any(k.startswith("text.") for k in d.state_dict()), "D holds no text encoder"
    assert not any(p.requires_grad for p in family.frozen_text.parameters())
    fresh = family._text_encoder()
    assert not torch.equal(fresh.embed.weight, family.frozen_text.embed.weight), "the weights are pre-trained"
    assert set(family.state()) == {"text_encoder"}, "checkpoints keep the frozen encoder (resume needs no cache)"

    batch = _batch()
    loss, stats = family.d_loss(_step(g, d), batch)
    loss.backward()
    assert stats["Penalty/MA-GP"] > 0 and all(p.grad is None for p in family.frozen_text.parameters())
    assert [p.grad is not None for p in d.parameters()].count(False) == 0
    ids, mask = family.tokenizer.encode(batch["caption"])
    torch.testing.assert_close(g.encode(batch["caption"]), family.frozen_text(ids, mask)[0])
    assert [phase.after for phase in family.phases] == [None, None], "nothing to copy into G after a D step"


def test_contrastive_two_ddp_ranks_equal_one_big_batch(tmp_path, env):
    """Rank 0 pre-trains (a cache of its own: the one process's is not there) and broadcasts: without it
    rank 1 has no weights to load."""
    (tmp_path / "split_cache").mkdir()
    split_env = {**env, "BIGAN_CACHE": str(tmp_path / "split_cache")}
    reference, split, initial = _equivalence(tmp_path, env, [sys.executable, "-m", "torch.distributed.run",
                                                              "--nproc_per_node=2", f"--master_port={free_port()}"],
                                             common=CONTRASTIVE, split_env=split_env)
    assert list((tmp_path / "split_cache" / "text_encoders").glob("contrastive-*.pt")), "pre-trained on 2 ranks"
    assert not any(k.startswith("D.text.") for k in initial)
    _assert_close(reference, split, initial)


def test_contrastive_run_resumes_bit_for_bit_without_pre_training_again(tmp_path, env):
    """The resumed run takes the encoder from the checkpoint (family.state): it neither pre-trains nor reads
    the cache, and continues exactly as the straight run."""
    common = {**TINY, **CONTRASTIVE}
    straight = tiny_args("demo_captions", tmp_path / "straight", **common, **{"train.kimg": 0.032})
    first = tiny_args("demo_captions", tmp_path / "split", **common, **{"train.kimg": 0.016})
    resumed = tiny_args("demo_captions", tmp_path / "split", **common, **{"train.kimg": 0.032, "run.resume": "latest"})
    result = run([sys.executable, str(HELPERS / "train_runs.py"), *straight, "--", *first, "--", *resumed], env)
    resumed_output = result.stdout.split("train_runs: ")[-1]
    assert "resuming from" in resumed_output and "text encoder pre-tra" not in resumed_output
    a, b = (checkpoint.checkpoints(tmp_path / name)[-1] for name in ("straight", "split"))
    assert a.name == b.name
    assert_same_checkpoint(a, b, checkpoint.states(a).values())


def test_a_checkpoint_from_before_the_key_resumes_only_as_joint(tmp_path):
    """architecture.json of DF-GAN runs written before dfgan.text_encoder existed: D trained the encoder."""
    from bigan.checkpoint import CheckpointError, _check_architecture
    from bigan.families.text2image import DFGAN

    (tmp_path / "architecture.json").write_text('{"dfgan.cond_dim": 16}')
    now = {"dfgan.cond_dim": 16, "dfgan.text_encoder": "contrastive"}
    with pytest.raises(CheckpointError, match=r"dfgan\.text_encoder='joint' \(now 'contrastive'\)"):
        _check_architecture(tmp_path, now, DFGAN.architecture_defaults)
    _check_architecture(tmp_path, {**now, "dfgan.text_encoder": "joint"}, DFGAN.architecture_defaults)


# ---------------------------------------------------------------- a local Hugging Face encoder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders") / "clip"
    _tiny_clip(folder)
    return folder


def test_hugging_face_encoder_sets_the_width_and_bad_folders_are_refused_naming_the_key(clip_folder, tmp_path):
    family = families.build(_config(**{"dfgan.text_encoder": clip_folder}))
    assert family.config.family_options.cond_dim == 32, "the sentence width is the encoder's"
    assert family.tokenizer is None and family.config.family_options.vocabulary == ""
    for overrides, key in (({"dfgan.text_encoder": tmp_path / "missing"}, "dfgan.text_encoder"),
                           ({"dfgan.text_encoder": tmp_path}, "dfgan.text_encoder"),
                           ({"dfgan.text_encoder": clip_folder, "dfgan.cond_dim": 16}, "dfgan.cond_dim")):
        with pytest.raises(ConfigError) as error:
            _config(**overrides)
        message = str(error.value)
        assert message.startswith(f"{key}:") and "\n" not in message, message


def test_hugging_face_encoder_stays_outside_g_and_trains(clip_folder):
    family = families.build(_config(**{"dfgan.text_encoder": clip_folder}))
    torch.manual_seed(0)
    networks = family.networks()
    g, d = networks["g"].module, networks["d"].module
    assert all(k.startswith("generator.") for k in g.state_dict()), "checkpoints, EMA and export hold G alone"
    assert d.text is None and copy.deepcopy(g).outside.module is g.outside.module, "the EMA shares, not copies"
    step, batch = _step(g, d), _batch()
    loss, stats = family.d_loss(step, batch)
    loss.backward()
    assert torch.isfinite(loss) and stats["Penalty/MA-GP"] > 0
    assert not any(p.grad is not None for p in family.frozen_text.parameters())
    g_loss, _ = family.g_loss(step, batch)
    g_loss.backward()
    assert all(p.grad is not None for p in g.generator.parameters())


def test_trains_with_a_local_encoder_and_samples_from_prompts(clip_folder, tmp_path, env):
    """Through bigan.train: the checkpoint and export hold G alone, architecture.json the folder, and
    bigan-sample loads the encoder from it."""
    from PIL import Image

    from bigan.sample import SampleError, load_generator
    from bigan.sample import main as sample

    args = tiny_args("demo_captions", tmp_path / "run", **{**HF_TINY, "dfgan.text_encoder": clip_folder,
                                                            "train.kimg": 0.016})
    run([sys.executable, str(HELPERS / "train_runs.py"), *args], env)
    latest = checkpoint.checkpoints(tmp_path / "run")[-1]
    assert all(k.startswith("generator.") for k in load_file(str(latest / "model.safetensors")))
    export = tmp_path / "run" / "export" / "generator_ema.safetensors"
    assert all(k.startswith("generator.") for k in load_file(str(export)))
    for source in (export, latest, tmp_path / "run"):  # the export, a checkpoint dir, the run dir
        assert sample(["--checkpoint", str(source), "--prompt", "a red sun over still water", "--n", "4",
                       "--out", str(tmp_path / "grid.png"), "--overwrite"]) == 0
        assert Image.open(tmp_path / "grid.png").size == (2 * 32, 2 * 32)
    clip_folder.rename(tmp_path / "moved")  # the folder architecture.json names is gone: one line naming it
    hf_encoder.cache_clear()  # (loaded by the samples above, in this process)
    try:
        with pytest.raises(SampleError, match=f"^--checkpoint: cannot rebuild the generator .*{clip_folder}"):
            load_generator(export)
    finally:
        (tmp_path / "moved").rename(clip_folder)
