"""The text-to-image demo's grid for README: held-out prompts (attribute combinations training never showed),
one row each: the prompt's own scene rendered (first column, the truth), then N images G drew from the prompt.

    .venv/bin/python bench/text2image_grid.py --checkpoint runs/text2image [--prompts 8] [--n 7]
        [--scale 2] [--out docs/text2image_demo.png]

Prints the prompts, one per row, as README lists them beside the grid.
"""
import argparse
from pathlib import Path

import torch
from PIL import Image

from bigan.data.captions import HELD_OUT_SEED, held_out_items, render_captioned_batch
from bigan.sample import generate, latents, load_generator
from bigan.tracking import image_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or exported generator")
    parser.add_argument("--prompts", type=int, default=8, help="rows: the first held-out prompts")
    parser.add_argument("--n", type=int, default=7, help="images drawn per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2, help="pixel repeat of the saved grid")
    parser.add_argument("--out", type=Path, default=Path("docs/text2image_demo.png"))
    args = parser.parse_args()
    g, model = load_generator(args.checkpoint)
    items = list(held_out_items(args.prompts))
    renders, _ = render_captioned_batch(HELD_OUT_SEED, [i for i, _, _ in items], model["resolution"])
    sentences = g.encode([text for _, _, text in items]).repeat_interleave(args.n, 0)
    drawn = generate(g, 0, latents(len(sentences), model["z_dim"], args.seed, None), labels=sentences)
    rows = [torch.cat([renders[i:i + 1].float() / 127.5 - 1, drawn[i * args.n:(i + 1) * args.n]])
            for i in range(len(items))]
    grid = Image.fromarray(image_grid(torch.cat(rows), args.n + 1))
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(items)} held-out prompts (rows), their real scene then {args.n} samples each")
    for row, (_, _, text) in enumerate(items, 1):
        print(f"{row}. {text}")


if __name__ == "__main__":
    main()
