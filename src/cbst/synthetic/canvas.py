"""A label map and an RGB image drawn together through one pinhole camera.

Primitives (polygons, discs, lines, boxes in world coordinates) fill the same pixels in both
arrays, so every drawn pixel's label is exact. Coordinates are fixed-point with ``_SHIFT``
fractional bits for sub-pixel accuracy in OpenCV's rasteriser.
"""

from __future__ import annotations

import cv2
import numpy as np

from cbst.synthetic.classes import Color
from cbst.synthetic.style import Style

_SHIFT = 3
_SCALE = float(1 << _SHIFT)


class Canvas:
    """A label map and an RGB image drawn together through one pinhole camera."""

    def __init__(self, width: int, height: int, style: Style, rng: np.random.Generator):
        self.w, self.h, self.style, self.rng = width, height, style, rng
        self.label = np.zeros((height, width), dtype=np.uint8)
        self.rgb = np.zeros((height, width, 3), dtype=np.uint8)
        self.yh = height * rng.uniform(*style.horizon)
        self.cx = width * (0.5 + rng.normal(0.0, 0.05))
        self.f = width * rng.uniform(*style.focal)
        self.cam_h = rng.uniform(*style.cam_height)

    # camera ----------------------------------------------------------------------------------
    def proj(self, x, y, z) -> np.ndarray:
        """World (lateral X, height Y above the ground, depth Z) -> image (x, y) points."""
        x, y, z = np.broadcast_arrays(
            np.asarray(x, float), np.asarray(y, float), np.maximum(np.asarray(z, float), 0.5)
        )
        return np.stack([self.cx + self.f * x / z, self.yh + self.f * (self.cam_h - y) / z], -1)

    def ppm(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.f / max(z, 0.5)

    # colours ---------------------------------------------------------------------------------
    def color(self, lab: int, shade: float = 1.0, jitter: float | None = None) -> Color:
        modes = self.style.colors[lab]
        base = np.asarray(modes[int(self.rng.integers(len(modes)))], float)
        j = self.style.jitter if jitter is None else jitter
        c = (base + self.rng.normal(0.0, j, 3)) * shade
        return tuple(int(v) for v in np.clip(c, 0, 255))

    # primitives ------------------------------------------------------------------------------
    @staticmethod
    def _fix(pts) -> np.ndarray:
        return np.round(np.clip(np.asarray(pts, float), -2e5, 2e5) * _SCALE).astype(np.int32)

    def poly(self, pts, lab: int, color: Color) -> None:
        p = [self._fix(pts).reshape(-1, 1, 2)]
        cv2.fillPoly(self.label, p, int(lab), cv2.LINE_8, _SHIFT)
        cv2.fillPoly(self.rgb, p, color, cv2.LINE_8, _SHIFT)

    def paint(self, pts, color: Color) -> None:
        """Colour only (details such as windows that keep the label underneath)."""
        cv2.fillPoly(self.rgb, [self._fix(pts).reshape(-1, 1, 2)], color, cv2.LINE_8, _SHIFT)

    def disc(self, center, radius: float, lab: int | None, color: Color, thickness: int = -1) -> None:
        c = tuple(int(v) for v in self._fix(center))
        r = int(round(max(radius, 0.5) * _SCALE))
        if lab is not None:
            cv2.circle(self.label, c, r, int(lab), thickness, cv2.LINE_8, _SHIFT)
        cv2.circle(self.rgb, c, r, color, thickness, cv2.LINE_8, _SHIFT)

    def line(self, p0, p1, width: float, lab: int, color: Color) -> None:
        t = max(1, int(round(width)))
        a, b = tuple(int(v) for v in self._fix(p0)), tuple(int(v) for v in self._fix(p1))
        cv2.line(self.label, a, b, int(lab), t, cv2.LINE_8, _SHIFT)
        cv2.line(self.rgb, a, b, color, t, cv2.LINE_8, _SHIFT)

    def box(self, x0, x1, y0, y1, z, lab, color) -> None:
        """A vertical rectangle facing the camera at depth ``z`` (world coordinates)."""
        self.poly(self.proj([x0, x1, x1, x0], [y0, y0, y1, y1], z), lab, color)

    def side(self, x, y0, y1, z0, z1, lab, color) -> None:
        """A vertical rectangle in the plane X = x from depth z0 to z1."""
        self.poly(self.proj(x, [y0, y0, y1, y1], [z0, z1, z1, z0]), lab, color)

    def ground(self, x0, x1, z0, z1, lab, color) -> None:
        self.poly(self.proj([x0, x1, x1, x0], 0.0, [z0, z0, z1, z1]), lab, color)
