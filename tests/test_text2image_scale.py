"""The large text-to-image preset (issue 27, item 7): what it promises is what the config builds."""
import torch

from bigan import families
from bigan.backends.deepspeed import load_ds_config, zero_stage
from bigan.config import load_config
from bigan.models import dfgan

PRESET = "launch_configs/experiments/text2image-xl.yaml"


def test_the_xl_preset_builds_a_300m_generator_for_zero3():
    """Through the config -> family path, on the meta device (no weights, no shards read): G has dfgan-256-xl's
    352 M parameters, G's DeepSpeed config is ZeRO-3 and D's ZeRO-2 (MA-GP refuses D on ZeRO-3)."""
    # (joint: the default pre-training of the text encoder needs real weights and the shards)
    config = load_config(PRESET, ["--dfgan.vocabulary=a red sun over still water", "--dfgan.text_encoder=joint"])
    with torch.device("meta"):
        networks = families.build(config).networks()
    counts = {name: sum(p.numel() for p in net.module.parameters()) for name, net in networks.items()}
    assert counts["g"] >= 300e6
    assert counts["g"] == dfgan.parameter_counts(**dfgan.PRESETS["dfgan-256-xl"])["generator"]
    t = config.train
    stages = {name: zero_stage(load_ds_config(path, t.batch_size, t.grad_accum, t.grad_clip, 8))
              for name, path in (("g", t.deepspeed_g), ("d", t.deepspeed_d))}
    assert stages == {"g": 3, "d": 2} and t.precision == "bf16"
