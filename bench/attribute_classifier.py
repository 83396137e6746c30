"""How well the attribute classifier of the text-to-image metric (attr) reads the captioned demo's scenes.

    .venv/bin/python bench/attribute_classifier.py [--seeds 3] [--n 1024] [--steps 300] [--out FILE.json]

Trains bigan.data.captions.train_attribute_classifier as bigan's attr metric does (1024 renders at
32 px, 300 steps), once per seed, and scores 1024 held-in renders of another seed, per attribute
(colour and time follow from style and celestial). Each accuracy must reach its bound in BOUNDS;
exits 1 if one does not. (tests/test_text_parts.py checks a briefly trained one in seconds.)
"""
import argparse
import json
import platform
import sys
import time

import torch

from bigan.data import captions as C

# Measured with 3 seeds (2026-12): style 0.99, celestial 1.00, colour and time 1.00, water 0.99-1.00, trees
# 0.80-0.89, ridges 0.45-0.47, all 0.35-0.42. Ridges stay near chance (1/3) at 32 px: in about a third of the
# scenes a nearer ridge or the lake covers one, and trees are a few pixels tall. Bounds leave room for noise.
BOUNDS = {"style": 0.95, "celestial": 0.97, "colour": 0.95, "time": 0.95, "water": 0.95, "trees": 0.7, "ridges": 0.38,
          "all": 0.25}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images, attributes = C.render_captioned_batch(C.CLASSIFIER_SEED + 1, range(1024), 32)
    runs = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        classifier = C.train_attribute_classifier(n=args.n, resolution=32, steps=args.steps,
                                                  seed=C.CLASSIFIER_SEED - seed)  # (+1 is scored)
        seconds = time.perf_counter() - start
        accuracy = C.attribute_accuracy(classifier, images, attributes)
        runs.append({"seed": seed, "train_s": round(seconds, 1), **{k: round(v, 3) for k, v in accuracy.items()}})
        print(json.dumps(runs[-1]), flush=True)
    short = sorted({k for r in runs for k, bound in BOUNDS.items() if r[k] < bound})
    result = {"machine": platform.processor() or platform.machine(), "n": args.n, "steps": args.steps,
              "runs": runs, "below_bounds": short}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("below bounds: " + (", ".join(short) or "none"))
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
