"""Referring expressions over the synthetic scenes: the VG split of the synthetic dataset (dataset=synthetic_vg).

Every expression names a set of objects of one scene by colour, shape, size or position, or names a
combination the scene does not hold (no target: ``empty``). Kinds, with the objects they refer to:

- ``category``  "red circle": every red circle.
- ``color``     "all blue shapes": every blue object.
- ``shape``     "all triangles": every triangle.
- ``size``      "the largest square", "the smallest red shape": the one object of that group (all shapes, a
                shape, a colour or a category; at least two members) whose visible area is the largest
                (smallest), at least SIZE_MARGIN times the runner-up's (or at most 1 / SIZE_MARGIN of it).
- ``position``  "the leftmost circle", "the topmost shape": the group's object whose box centre is furthest
                that way, at least POSITION_MARGIN of the image's width (height) ahead of the next one.
- ``relation``  "shape left of the green triangle": every other object whose box centre lies left of (right
                of, above, below) the centre of the anchor, an object whose category is unique in the scene; no
                object's centre is within POSITION_MARGIN of the anchor's along that axis, so none is borderline.
- ``no_target`` "green square", "all green shapes", "all circles" when the scene has none: refers to nothing.

`tokens_positive` of each referred region is the span of the referent's own words ("red circle", "largest
square", "blue shapes"; for a relation only "shape", never the anchor's words). The kind of each expression is
planned over the split so that every kind has its declared share exactly (largest remainder of
KIND_FRACTIONS x expressions), wherever the scenes offer enough candidates; the expression of a kind is then
drawn from the scene's candidates by the image's own RNG, seeded by (seed, split, index, EXPRESSION_STREAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

NO_TARGET_FRACTION = 0.2  # expressions that refer to nothing: the model must learn to say so
# share of a split's expressions per kind (sums to 1); size, position and relation need reading more than nouns
KIND_FRACTIONS: Dict[str, float] = {
    "category": 0.2,
    "color": 0.1,
    "shape": 0.1,
    "size": 0.15,
    "position": 0.15,
    "relation": 0.1,
    "no_target": NO_TARGET_FRACTION,
}
# Two per image in both splits: training sees each image under two prompts; validation gets twice the
# expressions (~26 no-target ones at the default 64 images) so no-target accuracy is not a handful of samples.
EXPRESSIONS_PER_IMAGE: Dict[str, int] = {"train": 2, "val": 2}
SIZE_MARGIN = 1.3  # the largest (smallest) object's area over the runner-up's (the runner-up's over it)
POSITION_MARGIN = 0.08  # of the image width (x) or height (y): no borderline "leftmost" or "left of"
EXPRESSION_STREAM = 1  # appended to the scene's seed: expressions never shift the scene's own random numbers
_PLAN_STREAM = 2  # the split-level kind plan's seed is (seed, split, _PLAN_STREAM)

_EXTREMES = (("leftmost", 0, -1), ("rightmost", 0, 1), ("topmost", 1, -1), ("bottommost", 1, 1))
_RELATIONS = (("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1))


@dataclass(frozen=True)
class Expression:
    """One referring expression: `referents` index the scene's objects (empty for no_target); `span` is the
    [start, end) of the referent's words in `text` (None for no_target)."""

    kind: str
    text: str
    referents: Tuple[int, ...]
    span: Optional[Tuple[int, int]]


@dataclass(frozen=True)
class SceneObject:
    """What the expressions read of a rendered object: colour and shape names, visible area (pixels), box
    centre (x, y) in pixels."""

    color: str
    shape: str
    area: float
    center: Tuple[float, float]


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def scene_objects(objects: Sequence[dict], colors: Sequence[str], shapes: Sequence[str]) -> List[SceneObject]:
    """SceneObjects of `render_scene`'s objects (keys label, bbox, area: the class index is colour-major)."""
    out = []
    for o in objects:
        x1, y1, x2, y2 = o["bbox"]
        out.append(SceneObject(colors[o["label"] // len(shapes)], shapes[o["label"] % len(shapes)],
                               float(o["area"]), ((x1 + x2) / 2, (y1 + y2) / 2)))
    return out


def _named(kind: str, text: str, words: str, referents) -> Expression:
    start = text.index(words)  # built from `words`, so it is there (and the templates hold it once)
    return Expression(kind, text, tuple(referents), (start, start + len(words)))


def _groups(objs: List[SceneObject], colors, shapes) -> List[Tuple[str, List[int]]]:
    """(noun, members) of every group with at least two members: all shapes, each shape, colour, category."""
    nouns = [("shape", lambda o: True)]
    nouns += [(s, lambda o, s=s: o.shape == s) for s in shapes]
    nouns += [(f"{c} shape", lambda o, c=c: o.color == c) for c in colors]
    nouns += [(f"{c} {s}", lambda o, c=c, s=s: (o.color, o.shape) == (c, s)) for c in colors for s in shapes]
    groups = [(noun, [i for i, o in enumerate(objs) if test(o)]) for noun, test in nouns]
    return [(noun, members) for noun, members in groups if len(members) >= 2]


def candidates(objs: List[SceneObject], colors: Sequence[str], shapes: Sequence[str],
               size: Tuple[int, int]) -> Dict[str, List[Expression]]:
    """Every expression of every kind that the scene supports, by kind (`size` is the image's (h, w))."""
    h, w = size
    extent = (w, h)
    out: Dict[str, List[Expression]] = {kind: [] for kind in KIND_FRACTIONS}
    # (kind, text, referent words, objects): a name with no object in the scene is a no-target expression
    named = [("category", f"{c} {s}", f"{c} {s}", lambda o, c=c, s=s: (o.color, o.shape) == (c, s))
             for c in colors for s in shapes]
    named += [("color", f"all {c} shapes", f"{c} shapes", lambda o, c=c: o.color == c) for c in colors]
    named += [("shape", f"all {plural(s)}", plural(s), lambda o, s=s: o.shape == s) for s in shapes]
    for kind, text, words, test in named:
        ids = [i for i, o in enumerate(objs) if test(o)]
        if ids:
            out[kind].append(_named(kind, text, words, ids))
        else:
            out["no_target"].append(Expression("no_target", text, (), None))
    for noun, members in _groups(objs, colors, shapes):
        by_area = sorted(members, key=lambda i: objs[i].area)
        if objs[by_area[-1]].area >= SIZE_MARGIN * objs[by_area[-2]].area:
            out["size"].append(_named("size", f"the largest {noun}", f"largest {noun}", [by_area[-1]]))
        if objs[by_area[1]].area >= SIZE_MARGIN * objs[by_area[0]].area:
            out["size"].append(_named("size", f"the smallest {noun}", f"smallest {noun}", [by_area[0]]))
        for word, axis, sign in _EXTREMES:
            ahead = sorted(members, key=lambda i: sign * objs[i].center[axis])
            gap = sign * (objs[ahead[-1]].center[axis] - objs[ahead[-2]].center[axis])
            if gap >= POSITION_MARGIN * extent[axis]:
                out["position"].append(_named("position", f"the {word} {noun}", f"{word} {noun}", [ahead[-1]]))
    categories = [(o.color, o.shape) for o in objs]
    for a, anchor in enumerate(objs):
        if categories.count((anchor.color, anchor.shape)) != 1:
            continue  # "the red circle" must name one object
        others = [i for i in range(len(objs)) if i != a]
        for word, axis, sign in _RELATIONS:
            offsets = {i: sign * (objs[i].center[axis] - anchor.center[axis]) for i in others}
            if any(abs(d) < POSITION_MARGIN * extent[axis] for d in offsets.values()):
                continue  # an object about level with the anchor: neither side of it
            ids = [i for i, d in offsets.items() if d > 0]
            if ids:
                text = f"shape {word} the {anchor.color} {anchor.shape}"
                out["relation"].append(_named("relation", text, "shape", ids))
    return out


def quotas(total: int) -> Dict[str, int]:
    """Expressions per kind out of `total`: KIND_FRACTIONS x total, rounded by largest remainder (ties in
    KIND_FRACTIONS order), so the counts sum to `total`."""
    raw = {k: f * total for k, f in KIND_FRACTIONS.items()}
    out = {k: int(np.floor(v)) for k, v in raw.items()}
    by_remainder = sorted(KIND_FRACTIONS, key=lambda k: -(raw[k] - out[k]))  # stable: ties keep table order
    for k in by_remainder[: total - sum(out.values())]:
        out[k] += 1
    return out


def plan_kinds(capacity: List[Dict[str, int]], per_image: int, rng: np.random.Generator) -> List[List[str]]:
    """The kinds of each image's `per_image` expressions. capacity[i][kind] = how many distinct expressions of
    that kind image i has. Scarce kinds are placed first, one per image per pass, over the images in `rng`'s
    order, so each kind spreads over many images; a kind the greedy pass leaves short then takes slots along
    augmenting paths (moving other kinds to images that still have room for them), so the quotas hold exactly
    whenever some assignment meets them. Slots left over (scenes too poor for the quotas) take any kind the
    image still offers, in table order."""
    n, table = len(capacity), list(KIND_FRACTIONS)
    want = quotas(n * per_image)
    count = [{k: 0 for k in table} for _ in range(n)]
    cap = [{k: min(c.get(k, 0), per_image) for k in table} for c in capacity]
    free = [per_image] * n
    images = [int(i) for i in rng.permutation(n)]

    def place(i: int, kind: str, step: int = 1) -> None:
        count[i][kind] += step
        free[i] -= step

    supply = {k: sum(c[k] for c in cap) for k in table}
    for kind in sorted((k for k in table if want[k]), key=lambda k: supply[k] / want[k]):
        for pass_no in range(per_image):  # a second expression of one kind per image only when needed
            for i in images:
                if sum(c[kind] for c in count) < want[kind] and free[i] and count[i][kind] == pass_no < cap[i][kind]:
                    place(i, kind)
    for kind in table:
        while sum(c[kind] for c in count) < want[kind] and _augment(kind, images, count, cap, free, place):
            pass
    for i in images:
        for kind in table:
            while free[i] and count[i][kind] < cap[i][kind]:
                place(i, kind)
    return [[k for k in table for _ in range(count[i][k])] for i in range(n)]


def _augment(kind: str, images: List[int], count, cap, free, place) -> bool:
    """One more `kind` along a shortest augmenting path: kind -> image with room for it -> another kind there,
    moved to an image with room for that one -> ... -> an image with a free slot. False when there is none."""
    via_image: Dict[int, str] = {}  # image -> the kind that enters it
    via_kind: Dict[str, int] = {kind: -1}  # kind -> the image it leaves
    frontier = [kind]
    while frontier:
        nxt = []
        for a in frontier:
            for i in images:
                if i in via_image or count[i][a] >= cap[i][a]:
                    continue
                via_image[i] = a
                if free[i]:
                    while True:  # walk back: each kind enters its image and leaves the previous one
                        a = via_image[i]
                        place(i, a)
                        i = via_kind[a]
                        if i < 0:
                            return True
                        place(i, a, -1)
                for b, c in count[i].items():
                    if c and b not in via_kind:
                        via_kind[b] = i
                        nxt.append(b)
        frontier = nxt
    return False


def draw_expressions(options: Dict[str, List[Expression]], kinds: Sequence[str],
                     rng: np.random.Generator) -> List[Expression]:
    """One expression per entry of `kinds`, drawn from the scene's candidates, never the same text twice."""
    out: List[Expression] = []
    for kind in kinds:
        pool = [e for e in options[kind] if e.text not in {x.text for x in out}]
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def odvg_line(file_name: str, h: int, w: int, expr: Expression, regions: Sequence[dict]) -> dict:
    """The ODVG VG line of an expression; `regions` are the scene's objects with keys bbox and rle."""
    out_regions = []
    for i in expr.referents:
        start, end = expr.span
        out_regions.append({"bbox": regions[i]["bbox"], "mask": regions[i]["rle"], "phrase": expr.text[start:end],
                            "tokens_positive": [[start, end]]})
    return {"file_name": file_name, "height": h, "width": w,
            "grounding": {"expression": expr.text, "regions": out_regions, "empty": not expr.referents,
                          "kind": expr.kind}}


def referring_split(rows: Sequence[Tuple[str, List[dict]]], split: str, split_id: int, seed: int,
                    colors: Sequence[str], shapes: Sequence[str], size: Tuple[int, int]) -> List[dict]:
    """The ODVG VG lines of one split: EXPRESSIONS_PER_IMAGE[split] per (file name, objects) row, objects as
    the generator keeps them (label, bbox, rle, area)."""
    per_image = EXPRESSIONS_PER_IMAGE[split]
    options = [candidates(scene_objects(objs, colors, shapes), colors, shapes, size) for _, objs in rows]
    capacity = [{k: len(v) for k, v in o.items()} for o in options]
    plan = plan_kinds(capacity, per_image, np.random.default_rng([seed, split_id, _PLAN_STREAM]))
    lines = []
    for index, ((file_name, objs), opts, kinds) in enumerate(zip(rows, options, plan)):
        rng = np.random.default_rng([seed, split_id, index, EXPRESSION_STREAM])
        for expr in draw_expressions(opts, kinds, rng):
            lines.append(odvg_line(file_name, size[0], size[1], expr, objs))
    return lines


def infer_lines(lines: Sequence[dict]) -> List[dict]:
    """The inference jsonl of a split's VG lines: {"image_path", "expression"} each."""
    return [{"image_path": ln["file_name"], "expression": ln["grounding"]["expression"]} for ln in lines]
