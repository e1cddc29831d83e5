"""The study's tuning protocol as pure functions: grids of config fields, the selection of a
variant's setting by its training loss, the extension of a grid whose best point is on its edge,
and half steps around the best point.

A *point* is a dict of dotted config fields (`train.lr`, `sparsity.supar`, ...) → values. A
variant's grid is the product of its axes. Numeric axes are tuned; the other axes (booleans,
strings) split the grid into *slices* that are each tuned on their own, so that for instance
SμPar on and off are both compared at their own best rate. The variant's setting is the best
point over all slices.

Why the training loss: every run makes one pass over the data (no token is seen twice), so the
mean training loss over the last steps is an unbiased estimate of the loss on unseen text, and
the held-out split — whose numbers are reported — is never used to choose.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

Point = dict[str, Any]


def expand(grid: dict[str, list]) -> list[Point]:
    """Every combination of the axes' values, in axis order (the last axis fastest)."""
    if not grid:
        return [{}]
    for field, values in grid.items():
        if "." not in field or not isinstance(values, list) or not values:
            raise ValueError(f"grid axis {field!r}: expected section.field: [values, ...]")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def nested(point: Point) -> dict[str, dict[str, Any]]:
    """{"train.lr": 1e-3} → {"train": {"lr": 1e-3}} (a config override tree)."""
    tree: dict[str, dict[str, Any]] = {}
    for field, value in point.items():
        section, _, name = field.partition(".")
        tree.setdefault(section, {})[name] = value
    return tree


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def slug(point: Point) -> str:
    """A directory name for a point: `lr=0.003,lr_mult_hidden=0.3`."""
    return ",".join(f"{field.rsplit('.', 1)[-1]}={_fmt(value)}" for field, value in point.items()) or "default"


def label(point: Point) -> str:
    return " ".join(f"{field.rsplit('.', 1)[-1]} {_fmt(value)}" for field, value in point.items()) or "(base)"


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def slice_key(point: Point) -> tuple:
    """The point's non-numeric values: which slice of the grid it is tuned in."""
    return tuple((f, v) for f, v in point.items() if not numeric(v))


def best(points: list[Point], losses: list[float]) -> int | None:
    """Index of the lowest finite loss (a diverged run has loss inf or nan), or None."""
    finite = [(loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)]
    return min(finite)[1] if finite else None


def edges(chosen: Point, points: list[Point]) -> list[str]:
    """The numeric axes on which `chosen` is the smallest or largest value tried, among the points
    that agree with it on every other axis (its line through the grid)."""
    out = []
    for field, value in chosen.items():
        if not numeric(value):
            continue
        line = _line(chosen, field, points)
        if len(line) >= 2 and value in (line[0], line[-1]):
            out.append(field)
    return out


def _line(chosen: Point, field: str, points: list[Point]) -> list:
    """The values of `field` tried among the points that agree with `chosen` on every other axis."""
    return sorted({p[field] for p in points
                   if field in p and all(p.get(f) == v for f, v in chosen.items() if f != field)})


def _toward(value: Any, neighbour: Any, weight: float) -> Any:
    """value·(neighbour/value)^weight on a positive axis (learning rates are geometric), else
    value + weight·(neighbour − value); rounded as the axis's type."""
    if value > 0 and neighbour > 0:
        out = value * (neighbour / value) ** weight
    else:
        out = value + weight * (neighbour - value)
    return type(value)(round(out, 12)) if isinstance(value, float) else round(out)


def beyond(chosen: Point, field: str, points: list[Point]) -> Any:
    """The next value of `field` past the edge `chosen` sits on: one more step of the same ratio
    (positive geometric axes, e.g. learning rates) or the same difference."""
    line = _line(chosen, field, points)
    value = chosen[field]
    return _toward(value, line[1] if value == line[0] else line[-2], -1.0)


def refinements(points: list[Point], losses: list[float]) -> list[Point]:
    """Half steps around the best point: on each numeric axis, the midpoints (geometric on a
    positive axis) between it and its neighbours on its line, the other axes kept. A grid's step
    (×3.3 for learning rates) can leave an optimum between points, and that costs a variant with
    two tuned axes more than one with a single axis; refining every compared variant's selection
    the same way removes most of that difference."""
    pick = best(points, losses)
    if pick is None:
        return []
    chosen, new = points[pick], []
    for field, value in chosen.items():
        if not numeric(value):
            continue
        line = _line(chosen, field, points)
        i = line.index(value)
        for neighbour in line[max(i - 1, 0):i] + line[i + 1:i + 2]:
            point = {**chosen, field: _toward(value, neighbour, 0.5)}
            if point[field] not in line and point not in new:
                new.append(point)
    return new


def selections(points: list[Point], losses: list[float]) -> dict[tuple, int]:
    """Per slice (see `slice_key`): the index of its best point."""
    out = {}
    for key in dict.fromkeys(slice_key(p) for p in points):
        members = [i for i, p in enumerate(points) if slice_key(p) == key]
        pick = best([points[i] for i in members], [losses[i] for i in members])
        if pick is not None:
            out[key] = members[pick]
    return out


def extensions(points: list[Point], losses: list[float]) -> list[Point]:
    """New points that move every slice's best off the edge of its grid: one step beyond each edge
    it sits on (not already tried)."""
    new: list[Point] = []
    for index in selections(points, losses).values():
        chosen = points[index]
        for field in edges(chosen, points):
            point = {**chosen, field: beyond(chosen, field, points)}
            if point not in points and point not in new:
                new.append(point)
    return new


def selection_loss(step_losses: dict[int, float], steps: int, fraction: float) -> float:
    """Mean training loss over the last `fraction` of `steps` (inf if any of them is missing or
    non-finite: a run that diverged is never selected)."""
    first = steps - max(1, round(fraction * steps)) + 1
    window = [step_losses.get(s, math.nan) for s in range(first, steps + 1)]
    if not all(math.isfinite(v) for v in window):
        return math.inf
    return sum(window) / len(window)
