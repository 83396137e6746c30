"""model.arch=dfgan's rprec and clip metrics: the real renders' R-precision well above chance and an untrained G's
at it, the same numbers on one rank and two, CLIP score as a direct computation with the model gives it, bad
CLIP folders refused in one line naming the key, and both logged by a short training run."""
import json
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigan import families
from bigan.config import ConfigError, load_config
from bigan.data import captions as C
from bigan.families import text2image_metrics as M
from bigan.families.text2image_eval import prompt_groups, prompted_scores
from conftest import HELPERS, run, tiny_args
from test_text2image import TINY
from test_trainer import _events

ONE_RANK = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, process_index=0, num_processes=1,
                           main_process_first=nullcontext)


@pytest.fixture(scope="module")
def cache(env):
    """The subprocesses' cache, holding the rprec evaluation pair as the metric trains it on first use (PAIR)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (as the suite's subprocesses: on a shared CPU, two threads make small steps 5x slower)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIGAN_CACHE", env["BIGAN_CACHE"])
        try:
            M.evaluation_pair(ONE_RANK)
        finally:
            torch.set_num_threads(threads)
        yield Path(env["BIGAN_CACHE"])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel with a word-level tokenizer and an image processor, saved as a real one is."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("clip")
    vocabulary = ["<pad>", "<unk>", "<s>", "</s>", *sorted({w for _, items in prompt_groups().items()
                                                           for _, text in items for w in text.split()})]
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>", model_max_length=16)
    text = transformers.CLIPTextConfig(vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=16))
    model.save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)  # (with the tokenizer: what AutoProcessor reads as a CLIPProcessor)
    return folder


def _family(**overrides):
    settings = {**TINY, "data.resolution": 32, "model.z_dim": 8, "model.g_channels": 4, "model.d_channels": 4,
                "dfgan.vocabulary": "a red sun over still water", **overrides}
    return families.build(load_config(None, [f"--{k}={v}" for k, v in settings.items()]))


def _untrained_g(family):
    torch.manual_seed(0)
    return family.build_generator().eval()


def test_rprec_real_renders_well_above_chance_untrained_g_at_it(cache):
    """Candidates: the fewest contradicting captions of a group's prompts, + 1 (19 and 23 of 32); the real
    renders' own prompts win for more than half of them, an untrained G's seldom (it draws about the same picture
    for every prompt, which the texts nearest to it win: up to 3.4x chance measured on the held-out prompts)."""
    candidates = {group: M.mismatches([text for _, text in items]).shape[1] + 1
                  for group, items in prompt_groups().items()}
    assert candidates == {"": 19, "_held_out": 23}
    family = _family()
    result = prompted_scores(family, _untrained_g(family), ONE_RANK, 256, 0, 64, ["rprec"])
    for group, r in candidates.items():
        chance = 1 / r
        assert result[f"rprec_real{group}"] > 8 * chance, result
        assert result[f"rprec{group}"] < min(5 * chance, result[f"rprec_real{group}"] / 3), result


def test_mismatches_contradict_the_prompt_and_differ_in_text():
    texts = [text for _, text in prompt_groups()[""]]
    table = M.mismatches(texts)
    for i, row in enumerate(table.tolist()):
        own = C.mentioned(texts[i])
        assert len(set(row)) == len(row) and i not in row
        for j in row:
            assert texts[j] != texts[i]
            assert any(k in C.mentioned(texts[j]) and C.mentioned(texts[j])[k] != v for k, v in own.items())
    assert torch.equal(table, M.mismatches(texts)), "drawn once, the same every time"


def test_two_ranks_give_the_one_rank_numbers(cache, clip_folder):
    """Rank 1 draws blocks 1, 3, ...; rank 0 blocks 0, 2, ... and the renders; their sums are one rank's."""
    family = _family(**{"dfgan.clip": clip_folder})
    g, wanted = _untrained_g(family), ["attr", "rprec", "clip"]
    family.config.family_options.attributes = str(_classifier(cache))
    one = prompted_scores(family, g, ONE_RANK, 96, 3, 16, wanted)
    sent = {}

    def rank(index, reduce):
        return SimpleNamespace(**{**vars(ONE_RANK), "process_index": index, "num_processes": 2, "reduce": reduce})

    prompted_scores(family, g, rank(1, lambda x, op: sent.setdefault("1", x)), 96, 3, 16, wanted)
    two = prompted_scores(family, g, rank(0, lambda x, op: x + sent["1"]), 96, 3, 16, wanted)
    assert one.keys() == two.keys() and len(one) == 14
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-9), key


def _classifier(cache):
    path = cache / "attributes-test.pt"
    if not path.exists():
        C.train_attribute_classifier(n=32, resolution=32, steps=2).save(str(path))
    return path


def test_clip_score_is_the_direct_computation(clip_folder):
    """100 * max(cos, 0) of CLIP's image and text features (get_image_features, get_text_features), averaged, as
    torchmetrics' CLIPScore computes it from the model and its processor."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip_folder, local_files_only=True)
    items = prompt_groups()["_held_out"][:6]
    texts = [text for _, text in items]
    images, _ = C.render_captioned_batch(C.HELD_OUT_SEED, [i for i, _ in items], 64)
    which = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    images = torch.cat([images, images[:2].flip(-1)])
    with torch.no_grad():
        scored = M.ClipScore(str(clip_folder), torch.device("cpu")).sums(images, texts, which)
        batch = processor(text=[texts[i] for i in which], images=[image.permute(1, 2, 0).numpy() for image in images],
                          return_tensors="pt", padding=True, truncation=True)
        image_features = _features(model.get_image_features(pixel_values=batch["pixel_values"]))
        text_features = _features(model.get_text_features(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]))
    cos = torch.nn.functional.cosine_similarity(image_features, text_features)
    assert scored[1] == len(images)
    assert float(scored[0] / scored[1]) == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert (cos > 0).all()
    opposite = clip_folder.parent / "opposite"  # its text features negated: every cosine below 0, every score 0
    model.text_projection.weight.data.neg_()
    model.save_pretrained(opposite)
    for name in clip_folder.iterdir():
        if not (opposite / name.name).exists():
            shutil.copy(name, opposite / name.name)
    with torch.no_grad():
        assert M.ClipScore(str(opposite), torch.device("cpu")).sums(images, texts, which)[0] == 0


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # (transformers 4: a tensor; 5: an output)


def test_bad_clip_settings_are_refused_in_one_line_naming_the_key(tmp_path, clip_folder):
    base = ["--model.arch=dfgan", "--eval.metrics=clip"]
    with pytest.raises(ConfigError, match=r"^eval\.metrics: clip needs a local CLIP model: set dfgan\.clip"):
        load_config(None, base)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for folder in (tmp_path / "missing", tmp_path / "bert"):
        with pytest.raises(ConfigError) as error:
            load_config(None, [*base, f"--dfgan.clip={folder}"])
        assert str(error.value).startswith("dfgan.clip: must be a folder holding a CLIP model")
        assert str(folder) in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "weightless").mkdir()  # passes the cheap look, fails to load
    (tmp_path / "weightless" / "config.json").write_text((clip_folder / "config.json").read_text())
    for folder in (tmp_path / "missing", tmp_path / "bert", tmp_path / "weightless"):
        with pytest.raises(M.ClipError) as error:
            M.clip_model(str(folder), "dfgan.clip")
        message = str(error.value)
        assert message.startswith(f"dfgan.clip: {folder}") and "\n" not in message, message


def test_bigan_eval_rprec_and_clip_and_its_clip_flag(runs, clip_folder, capsys, tmp_path):
    from bigan.metrics.evaluate import main

    checkpoint = str(runs / "run")
    assert main(["--checkpoint", checkpoint, "--metrics", "rprec,clip", "--clip", str(clip_folder), "--n", "32",
                 "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert {"rprec", "rprec_real_held_out", "clip", "clip_real", "clip_held_out"} <= result.keys()
    assert main(["--checkpoint", checkpoint, "--metrics", "clip", "--clip", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"bigan-eval: error: --clip: {tmp_path / 'nothing'} is no folder"), err
    for flags, why in ((["--metrics", "clip"], "--clip: --metrics clip needs"),
                       (["--metrics", "rprec", "--clip", str(clip_folder)], "--clip would do nothing")):
        with pytest.raises(SystemExit) as code:
            main(["--checkpoint", checkpoint, *flags])
        assert code.value.code == 2 and why in capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env, cache, clip_folder):
    """A short run evaluated with attr, rprec and clip (the pair read from the cache the fixture filled)."""
    root = tmp_path_factory.mktemp("dfgan_metrics")
    args = tiny_args("demo_captions", root / "run", **TINY, **{
        "train.kimg": 0.016, "eval.every_kimg": 0.016, "eval.n": 16, "eval.metrics": "attr,rprec,clip",
        "dfgan.attributes": _classifier(cache), "dfgan.clip": clip_folder})
    result = run([sys.executable, str(HELPERS / "train_runs.py"), *args], env)
    assert "training the evaluation pair" not in result.stdout, "read from the cache, not trained again"
    return root


def test_a_training_run_logs_rprec_and_clip(runs):
    scalars = _events(runs / "run").Tags()["scalars"]
    for tag in ("Metrics/rprec", "Metrics/rprec_held_out", "Metrics/rprec_real", "Metrics/rprec_real_held_out",
                "Metrics/clip", "Metrics/clip_held_out", "Metrics/clip_real", "Metrics/attr_acc"):
        assert tag in scalars, tag


def test_a_clip_folder_that_does_not_load_stops_the_run_at_start_up(tmp_path, env, clip_folder):
    """It passes the config's cheap look (config.json says clip) but holds no weights: one line, nothing written."""
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text((clip_folder / "config.json").read_text())
    args = tiny_args("demo_captions", tmp_path / "run", **TINY, **{
        "train.kimg": 0.016, "eval.every_kimg": 0.016, "eval.metrics": "clip", "dfgan.clip": tmp_path / "weightless"})
    result = run([sys.executable, "-m", "bigan.train", *args], env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"bigan: error: dfgan.clip: {tmp_path / 'weightless'}")
    assert not (tmp_path / "run").exists()


def test_the_evaluation_pair_starts_alike_and_leaves_the_callers_draws_alone():
    """Trained mid-run on rank 0 on first use: the run's own random draws must not depend on whether it was."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = M.train_evaluation_pair(n=16, resolution=32, steps=2, dim=8, width=8)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)
    second = M.train_evaluation_pair(n=16, resolution=32, steps=2, dim=8, width=8)
    for part in ("text", "image"):
        assert all(torch.equal(first[part][k], second[part][k]) for k in first[part]), part
