"""The built-in demo task: procedurally generated "shapes in clutter" images (seeded, no download).

Each image holds one large object whose SHAPE and STYLE give the class (8 shapes x filled / outline = 16 classes),
drawn at a random position, size, tilt (+-30 degrees) and bright colour over a dark, tinted gradient with
low-frequency texture, with small distractors (dots, squares, line segments, some as bright as the object) behind and
in front of it, a dark occluding rectangle on 40 % of the images and per-pixel noise. A bright object on a dark
background keeps the task learnable in a CPU-minutes demo (random colours everywhere made it too slow to start). The shapes differ in details (a pentagon from a hexagon from a circle, a star's points)
that survive the clutter only partly, so the task is neither trivial nor saturated at 56 px: networks of different
capacity reach different accuracies, which is what the demo search needs to separate candidates (the digits it
replaces are solved to 100 % by most sub-networks).

`generate(n, img_size, seed)` is a pure function of its arguments (torch's CPU generator): the same seed gives the
same images on every machine, and the labels are class-balanced (n // 16 per class, the remainder to the first
classes). Rendering is vectorised over chunks of images; a few thousand 56 px images take seconds.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["SHAPES", "STYLES", "CLASSES", "NUM_CLASSES", "generate"]

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "crescent")
STYLES = ("filled", "outline")
CLASSES = tuple(f"{shape}-{style}" for style in STYLES for shape in SHAPES)
NUM_CLASSES = len(CLASSES)

_CHUNK = 512


def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _soft(signed_px: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage from a signed distance in pixels (> 0 inside)."""
    return (signed_px + 0.5).clamp(0, 1)


def _object_radius(shape: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """rho = distance / boundary distance along the same ray, per pixel (< 1 inside the object) for each image's
    shape id; x, y in object coordinates (rotated, centred), r the object's radius. Shapes (B,), x/y (B, S, S)."""
    d = torch.sqrt(x * x + y * y).clamp_min(1e-6)
    theta = torch.atan2(y, x)
    rr = r[:, None, None]
    rho = d / rr                                                     # circle
    out = rho.clone()
    for n, sid in ((3, 1), (4, 2), (5, 3), (6, 4)):                  # regular polygons
        sector = 2 * math.pi / n
        local = torch.remainder(theta, sector) - sector / 2
        poly = d * torch.cos(local) / (rr * math.cos(math.pi / n))
        out = torch.where((shape == sid)[:, None, None], poly, out)
    # five-pointed star: the boundary radius is a triangle wave between 0.45 r and r over each point's sector
    sector = 2 * math.pi / 5
    wave = (torch.remainder(theta, sector) / sector - 0.5).abs() * 2  # 1 at a point, 0 between two points
    star = d / (rr * (0.45 + 0.55 * wave))
    out = torch.where((shape == 5)[:, None, None], star, out)
    # plus-shaped cross: arms 0.34 r wide
    ax, ay = x.abs() / rr, y.abs() / rr
    cross = torch.minimum(torch.maximum(ax / 0.34, ay), torch.maximum(ay / 0.34, ax))
    out = torch.where((shape == 6)[:, None, None], cross, out)
    # crescent: the disc minus a disc of radius 0.8 r shifted by 0.45 r
    bite = torch.sqrt((x - 0.45 * rr) ** 2 + y * y) / (0.8 * rr)
    crescent = torch.maximum(rho, 1.0 / bite.clamp_min(1e-6))
    out = torch.where((shape == 7)[:, None, None], crescent, out)
    return out


def _paint(canvas: torch.Tensor, alpha: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Composite colour (B, 3) with coverage alpha (B, S, S) over canvas (B, 3, S, S)."""
    a = alpha[:, None]
    return canvas * (1 - a) + color[:, :, None, None] * a


def _distractors(canvas, g, u, v, px, count_lo, count_hi):
    """Small dots, squares and line segments in random colours (the clutter)."""
    b = canvas.shape[0]
    n = int(torch.randint(count_lo, count_hi + 1, (1,), generator=g))
    for _ in range(n):
        kind = torch.randint(0, 3, (b,), generator=g)
        cx, cy = _uniform(g, (b, 1, 1), -0.95, 0.95), _uniform(g, (b, 1, 1), -0.95, 0.95)
        size = _uniform(g, (b, 1, 1), 0.04, 0.09)
        ang = _uniform(g, (b, 1, 1), 0, math.pi)
        dx, dy = u - cx, v - cy
        dot = (size - torch.sqrt(dx * dx + dy * dy)) * px
        square = (size - torch.maximum(dx.abs(), dy.abs())) * px
        # a segment of half-length 3 * size through (cx, cy) at angle ang, 1.2 px thick
        along = dx * torch.cos(ang) + dy * torch.sin(ang)
        across = -dx * torch.sin(ang) + dy * torch.cos(ang)
        seg = torch.minimum(0.6 - across.abs() * px, (3 * size - along.abs()) * px)
        signed = torch.where((kind == 0)[:, None, None], dot, torch.where((kind == 1)[:, None, None], square, seg))
        canvas = _paint(canvas, _soft(signed), torch.rand((b, 3), generator=g))
    return canvas


def _render(labels: torch.Tensor, img_size: int, g: torch.Generator) -> torch.Tensor:
    b, s = labels.shape[0], img_size
    px = s / 2.0                                                     # pixels per unit of the [-1, 1] frame
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    u, v = u.expand(b, s, s), v.expand(b, s, s)

    # background: a dark, tinted random colour, a linear gradient and smooth (bilinearly upsampled 5x5) texture
    base = _uniform(g, (b, 1), 0.05, 0.35) + _uniform(g, (b, 3), -0.05, 0.05)
    grad = _uniform(g, (b, 3, 2), -0.15, 0.15)
    low = F.interpolate(_uniform(g, (b, 3, 5, 5), -0.1, 0.1), size=(s, s), mode="bilinear", align_corners=False)
    canvas = (base[:, :, None, None] + grad[:, :, 0, None, None] * u[:, None] + grad[:, :, 1, None, None] * v[:, None]
              + low).clamp(0, 1)
    canvas = _distractors(canvas, g, u, v, px, 1, 3)                  # behind the object

    shape, style = labels % len(SHAPES), labels // len(SHAPES)
    r = _uniform(g, (b,), 0.4, 0.7)
    cx, cy = _uniform(g, (b,), -1, 1) * (0.9 - r), _uniform(g, (b,), -1, 1) * (0.9 - r)
    ang = _uniform(g, (b,), -math.pi / 6, math.pi / 6)
    dx, dy = u - cx[:, None, None], v - cy[:, None, None]
    c, sn = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    rho = _object_radius(shape, dx * c + dy * sn, -dx * sn + dy * c, r)
    edge_px = r[:, None, None] * px                                  # the object's radius in pixels
    inside = (1 - rho) * edge_px
    thickness = _uniform(g, (b, 1, 1), 0.22, 0.34)                   # outline width, as a fraction of the radius
    ring = torch.minimum(inside, (rho - (1 - thickness)) * edge_px)
    alpha = _soft(torch.where((style == 1)[:, None, None], ring, inside))
    # a bright colour: the object stands out from the dark background (distractors may be as bright)
    color = _uniform(g, (b, 1), 0.6, 1.0) * (1 - _uniform(g, (b, 3), 0, 0.6))
    shade = 1 + F.interpolate(_uniform(g, (b, 1, 4, 4), -0.15, 0.15), size=(s, s), mode="bilinear",
                              align_corners=False)
    canvas = canvas * (1 - alpha[:, None]) + (color[:, :, None, None] * shade).clamp(0, 1) * alpha[:, None]

    canvas = _distractors(canvas, g, u, v, px, 0, 2)                  # in front of the object
    # an occluding rectangle near the object on about half of the images
    occlude = torch.rand((b,), generator=g) < 0.4
    ox = cx + _uniform(g, (b,), -0.7, 0.7) * r
    oy = cy + _uniform(g, (b,), -0.7, 0.7) * r
    hw, hh = _uniform(g, (b,), 0.08, 0.18), _uniform(g, (b,), 0.08, 0.18)
    box = torch.minimum(hw[:, None, None] - (u - ox[:, None, None]).abs(),
                        hh[:, None, None] - (v - oy[:, None, None]).abs()) * px
    box_alpha = _soft(box) * occlude[:, None, None]
    canvas = _paint(canvas, box_alpha, _uniform(g, (b, 3), 0.0, 0.4))   # dark: it hides part of the object

    sigma = _uniform(g, (b, 1, 1, 1), 0.02, 0.08)
    canvas = canvas + sigma * torch.randn(canvas.shape, generator=g)
    return (canvas.clamp(0, 1) * 255).round().to(torch.uint8)


def generate(n: int, img_size: int = 56, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n, 3, S, S), labels int64 (n,)): n images, class-balanced, in a seeded random order."""
    if n < 1:
        raise ValueError(f"generate needs n >= 1 images, got {n}")
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8 pixels, got {img_size}")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    images = torch.cat([_render(labels[i:i + _CHUNK], img_size, g) for i in range(0, n, _CHUNK)])
    return images, labels
