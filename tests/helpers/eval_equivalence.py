"""Evaluate a fixed generator with 1 or N processes and write the metrics and mode coverage (rank 0).

    python eval_equivalence.py OUT.json SHARDS EXTRACTOR
    torchrun --nproc_per_node 2 eval_equivalence.py OUT.json SHARDS EXTRACTOR
"""
import json
import os
import sys

import torch
from accelerate import Accelerator

from bigan.metrics.evaluate import evaluate, generated_images
from bigan.metrics.features import Extractor, ModeClassifier
from bigan.models import build_models

out, shards, extractor_path = sys.argv[1:4]
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == int(os.environ.get("WORLD_SIZE", "1"))
torch.manual_seed(0)
g, _ = build_models("dcgan", 32, 16, 8, 8)
g.eval()
blocks = generated_images(g, 16, 0, accelerator, n=80, batch=16)
result = evaluate(blocks, shards, 32, Extractor(extractor_path, resolution=32), accelerator, n=80,
                  wanted=("fid", "kid", "pr", "is"), batch=16, keep=64,
                  classifier=ModeClassifier(extractor_path, resolution=32))  # its logits as classes: mode counts add up too
if accelerator.is_main_process:
    with open(out, "w") as f:
        json.dump(result, f)
