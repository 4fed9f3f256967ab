"""One picture of every arm's instance maps for the same held-out pictures: the rows "picture" and "truth" of the
first model's `umm eval --out DIR` grid (DIR/seg-miou.png), then the "generated" row of each model's grid.

    .venv/bin/python compose_grid.py OUT.png NAME=EVAL_DIR [NAME=EVAL_DIR ...]

The models must have been evaluated on the same world (same job seed): the script checks that their "picture" rows
are identical.  Layout of umm_ops.eval.runner.save_grid: 90 px of row labels, then 64 px tiles with 4 px gaps.
"""
import sys

from PIL import Image, ImageChops, ImageDraw

TILE, PAD, LEFT = 64, 4, 90


def row(im, r):
    return im.crop((LEFT, r * (TILE + PAD), im.width, r * (TILE + PAD) + TILE))


def main():
    out, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    grids = [(name, Image.open(f"{d}/seg-miou.png").convert("RGB")) for name, d in pairs]
    first = grids[0][1]
    for name, im in grids[1:]:
        if ImageChops.difference(row(im, 0), row(first, 0)).getbbox() is not None:
            raise SystemExit(f"{name}: its pictures differ from {grids[0][0]}'s (another world / records)")
    rows = [("picture", row(first, 0)), ("truth", row(first, 1))] + [(n, row(im, 2)) for n, im in grids]
    W = LEFT + rows[0][1].width
    canvas = Image.new("RGB", (W, len(rows) * (TILE + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, strip) in enumerate(rows):
        canvas.paste(strip, (LEFT, i * (TILE + PAD)))
        draw.text((4, i * (TILE + PAD) + TILE // 2 - 6), name[:14], fill="black")
    canvas.save(out)


if __name__ == "__main__":
    main()
