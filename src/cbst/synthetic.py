"""An embedded synthetic benchmark: a small, fair miniature of GTA5 -> Cityscapes.

``make_synthetic(out)`` renders two domains of procedurally drawn street scenes with the 19
Cityscapes classes, in the on-disk layouts of the real data sets (spec §6.3, §6.5):

* **source** ("game", GTA5 layout): ``gta5/images/NNNNN.png`` (RGB) and ``gta5/labels/NNNNN.png``
  (8-bit palette PNG whose indices are Cityscapes labelIds);
* **target** ("camera", Cityscapes layout): ``cityscapes/leftImg8bit/{train,val}/<city>/...`` and
  ``cityscapes/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png`` (mode L, labelIds).

The scenes share one geometry (a pinhole camera over a flat street: sky, road to a vanishing
point, sidewalks, facades, vegetation, poles with lights and signs, people, riders and vehicles,
drawn far to near) but the two domains differ both in appearance (flat saturated "game" shading
against textured, blurred, low-contrast, colour-cast, vignetted "camera" frames with different
per-class colour distributions) and in layout statistics (horizon height, object counts and
sizes, class frequencies). See ``docs/synthetic_benchmark.md``.

Every image is drawn from its own ``np.random.default_rng([seed, domain_id, index])``, so a set is
byte-identical for the same seed and :data:`SYNTHETIC_VERSION`, and images are independent of
each other. Any change to the rendering must bump :data:`SYNTHETIC_VERSION`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
from PIL import Image

from cbst.io import write_json, write_png, write_text
from cbst.labels import CITYSCAPES_19, IGNORE_INDEX, Protocol, cityscapes_palette

SYNTHETIC_VERSION = "1.1"
"""Version of the renderer. Same version + seed + parameters => byte-identical files."""

DOMAIN_SOURCE, DOMAIN_TARGET_TRAIN, DOMAIN_TARGET_VAL = 0, 1, 2
TRAIN_CITIES: tuple[str, ...] = ("synthtown", "pixelburg")
VAL_CITIES: tuple[str, ...] = ("renderdorf",)
CITY_FRAME = 19  # Cityscapes annotates the 20th frame of each snippet: <city>_<seq>_000019
SUMMARY_NAME = "synthetic.json"


class SyntheticExistsError(ValueError):
    """The output folder holds something other than this exact synthetic benchmark."""


# Cityscapes labelIds (spec §6.1) and the void ids used here.
UNLABELED, EGO, OUT_OF_ROI, STATIC = 0, 1, 3, 4
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BICYCLE = 24, 25, 26, 27, 28, 31, 32, 33

_SHIFT = 3
_SCALE = float(1 << _SHIFT)

Color = tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# Domain styles
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Style:
    """Everything that differs between the two domains (layout statistics and appearance)."""

    name: str
    horizon: tuple[float, float]        # horizon row as a fraction of the height
    cam_height: tuple[float, float]     # metres
    focal: tuple[float, float]          # focal length as a fraction of the width
    road_half: tuple[float, float]      # metres
    sidewalk: tuple[float, float]       # metres
    setback: tuple[float, float]        # terrain strip between sidewalk and facades, metres
    facade_probs: dict[str, float]      # building / wall / fence / veg / open
    building_height: tuple[float, float]
    n_cars: float                       # Poisson means per image
    n_trucks: float
    n_buses: float
    p_train: float
    n_persons: float
    n_cyclists: float
    n_motorcyclists: float
    n_parked_bikes: float
    n_parked_motos: float
    n_trees: float
    n_static: float
    pole_spacing: tuple[float, float]   # metres between poles along each side
    p_light: float                      # a pole carries a traffic light
    p_sign: float                       # a pole carries a traffic sign
    person_height: tuple[float, float]
    car_scale: tuple[float, float]
    p_ego: float                        # ego-vehicle hood at the bottom (void)
    roi_border: int                     # out-of-roi border (void), pixels
    colors: dict[int, list[Color]]      # per labelId: colour modes of the domain
    jitter: float                       # per-instance colour jitter (std, 0-255 scale)
    textured: bool


_SOURCE_COLORS: dict[int, list[Color]] = {
    ROAD: [(78, 76, 88)], SIDEWALK: [(176, 146, 156), (168, 160, 150)],
    BUILDING: [(176, 120, 84), (200, 170, 120), (150, 150, 165), (190, 100, 80)],
    WALL: [(196, 190, 160)], FENCE: [(134, 96, 58), (110, 120, 130)],
    POLE: [(120, 120, 128)], LIGHT: [(34, 38, 30)], SIGN: [(235, 30, 30), (30, 80, 230), (245, 215, 0)],
    VEG: [(40, 156, 36), (70, 140, 20)], TERRAIN: [(150, 196, 70)], SKY: [(80, 160, 250)],
    PERSON: [(210, 40, 40), (40, 60, 200), (240, 200, 40), (30, 30, 30), (230, 230, 230)],
    RIDER: [(250, 120, 0), (20, 160, 160), (200, 0, 150)],
    CAR: [(200, 20, 20), (20, 40, 190), (235, 235, 235), (30, 30, 35), (160, 160, 170), (0, 140, 60)],
    TRUCK: [(230, 230, 220), (200, 90, 20), (60, 90, 160)], BUS: [(240, 190, 10), (210, 40, 30)],
    TRAIN: [(200, 40, 40), (230, 230, 230)], MOTO: [(20, 20, 20), (200, 0, 0), (0, 60, 200)],
    BICYCLE: [(40, 200, 80), (230, 40, 40), (30, 30, 30)], STATIC: [(90, 140, 60), (130, 110, 90)],
    EGO: [(40, 40, 48)],
}

# Real-camera colour statistics: same families (a class stays recognisable), other means and
# spreads, mostly greyer and darker; the sky is an overcast white-blue as in most Cityscapes frames.
_CAMERA_COLORS: dict[int, list[Color]] = {
    ROAD: [(116, 112, 110), (100, 100, 104)], SIDEWALK: [(150, 144, 138), (140, 128, 124)],
    BUILDING: [(132, 122, 110), (160, 150, 134), (110, 108, 112), (150, 110, 90)],
    WALL: [(160, 152, 136), (130, 130, 124)], FENCE: [(110, 100, 86), (90, 96, 96)],
    POLE: [(92, 94, 94), (70, 74, 70)], LIGHT: [(46, 46, 42)],
    SIGN: [(190, 50, 40), (40, 80, 160), (210, 190, 60), (220, 220, 215)],
    VEG: [(78, 104, 50), (96, 116, 58), (60, 84, 44)], TERRAIN: [(128, 138, 86), (140, 132, 96)],
    SKY: [(196, 208, 220), (170, 192, 214)],
    PERSON: [(60, 60, 70), (130, 40, 50), (40, 50, 90), (180, 170, 150), (90, 80, 60)],
    RIDER: [(150, 80, 40), (40, 100, 100), (80, 80, 90)],
    CAR: [(120, 30, 30), (40, 50, 90), (190, 190, 186), (40, 40, 44), (130, 132, 136), (60, 80, 60)],
    TRUCK: [(190, 190, 182), (150, 90, 50), (70, 80, 110)], BUS: [(200, 200, 196), (150, 40, 40), (50, 70, 110)],
    TRAIN: [(210, 205, 190), (170, 60, 50)], MOTO: [(40, 40, 44), (140, 30, 30), (60, 70, 110)],
    BICYCLE: [(50, 50, 54), (120, 40, 40), (60, 100, 70)], STATIC: [(70, 90, 60), (110, 100, 90)],
    EGO: [(24, 24, 28)],
}

CAMERA_SHIFT = 0.5
"""How far the target's colours move from the game's toward the camera statistics above (0..1).

Calibrated once (version 1.1) against source-only training alone, so that a source model scores
well below its source-domain accuracy on the target, as GTA5 models do on Cityscapes; at 1.0 a
model trained from scratch on flat game colours recognised almost nothing in the target.
"""


def _shifted(game: list[Color], camera: list[Color], shift: float) -> list[Color]:
    """Each camera colour mode moved from its nearest game mode by ``shift`` of the distance."""
    out = []
    for c in camera:
        g = min(game, key=lambda m: sum((a - b) ** 2 for a, b in zip(m, c)))
        out.append(tuple(int(round(a + shift * (b - a))) for a, b in zip(g, c)))
    return out


_TARGET_COLORS: dict[int, list[Color]] = {
    k: _shifted(_SOURCE_COLORS[k], v, CAMERA_SHIFT) for k, v in _CAMERA_COLORS.items()}

SOURCE_STYLE = _Style(
    name="game", horizon=(0.40, 0.54), cam_height=(1.2, 1.8), focal=(0.95, 1.1),
    road_half=(4.0, 7.5), sidewalk=(1.5, 3.5), setback=(0.0, 7.0),
    facade_probs={"building": 0.45, "wall": 0.12, "fence": 0.08, "veg": 0.2, "open": 0.15},
    building_height=(6.0, 22.0),
    n_cars=4.0, n_trucks=1.4, n_buses=0.4, p_train=0.15, n_persons=2.0, n_cyclists=0.35,
    n_motorcyclists=0.45, n_parked_bikes=0.2, n_parked_motos=0.35, n_trees=3.0, n_static=0.8,
    pole_spacing=(25.0, 55.0), p_light=0.25, p_sign=0.25, person_height=(1.65, 1.95),
    car_scale=(0.95, 1.15), p_ego=0.1, roi_border=0, colors=_SOURCE_COLORS, jitter=10.0,
    textured=False,
)

TARGET_STYLE = _Style(
    name="camera", horizon=(0.32, 0.46), cam_height=(1.1, 1.4), focal=(1.05, 1.25),
    road_half=(3.0, 6.0), sidewalk=(2.0, 4.5), setback=(0.0, 4.0),
    facade_probs={"building": 0.55, "wall": 0.1, "fence": 0.1, "veg": 0.2, "open": 0.05},
    building_height=(8.0, 26.0),
    n_cars=6.0, n_trucks=0.25, n_buses=0.25, p_train=0.12, n_persons=4.5, n_cyclists=0.9,
    n_motorcyclists=0.25, n_parked_bikes=1.2, n_parked_motos=0.2, n_trees=4.0, n_static=1.5,
    pole_spacing=(22.0, 50.0), p_light=0.3, p_sign=0.45, person_height=(1.55, 1.9),
    car_scale=(0.9, 1.05), p_ego=1.0, roi_border=2, colors=_TARGET_COLORS, jitter=18.0,
    textured=True,
)

# Texture amplitudes (target only): fine per-pixel grain and blotchy low-frequency variation.
_TEX_FINE = {ROAD: 10, SIDEWALK: 9, BUILDING: 8, WALL: 9, FENCE: 8, VEG: 24, TERRAIN: 16,
             SKY: 2, PERSON: 6, RIDER: 6, CAR: 4, TRUCK: 5, BUS: 4, TRAIN: 4, POLE: 4,
             STATIC: 8, EGO: 3}
_TEX_LOW = {ROAD: 8, SIDEWALK: 8, BUILDING: 10, WALL: 8, FENCE: 6, VEG: 16, TERRAIN: 14,
            SKY: 10, STATIC: 6}


def _lut(table: dict[int, float]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    for k, v in table.items():
        lut[k] = v
    return lut


_TEX_FINE_LUT, _TEX_LOW_LUT = _lut(_TEX_FINE), _lut(_TEX_LOW)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

class _Canvas:
    """A label map and an RGB image drawn together through one pinhole camera."""

    def __init__(self, width: int, height: int, style: _Style, rng: np.random.Generator):
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
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float),
                                      np.maximum(np.asarray(z, float), 0.5))
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


def _poisson(rng: np.random.Generator, lam: float) -> int:
    return int(rng.poisson(lam))


def _draw_background(cv: _Canvas, scene: dict) -> None:
    rng, w, h = cv.rng, cv.w, cv.h
    # Sky: vertical gradient towards the horizon.
    top, low = np.array(cv.color(SKY, 0.85, 6)), np.array(cv.color(SKY, 1.08, 6))
    yy = np.clip(np.arange(h, dtype=np.float32) / max(cv.yh, 1.0), 0, 1)[:, None]
    cv.rgb[:] = np.clip(top * (1 - yy) + low * yy, 0, 255).astype(np.uint8)[:, None, :]
    cv.label[:] = SKY
    zend = scene["zend"]
    # Ground up to the end of the street: terrain, then road and sidewalks on top.
    cv.ground(-400, 400, 0.5, zend, TERRAIN, cv.color(TERRAIN))
    rw, sw = scene["road_half"], scene["sidewalk"]
    cv.ground(-rw, rw, 0.5, zend, ROAD, cv.color(ROAD))
    for s in (-1, 1):
        col = scene["sidewalk_color"]
        cv.ground(s * rw, s * (rw + sw), 0.5, zend, SIDEWALK, col)
        kerb = tuple(int(min(255, c * 1.2)) for c in col)
        cv.ground(s * rw, s * (rw + 0.2), 0.5, zend, SIDEWALK, kerb)
    # Lane markings (road) and a dashed centre line.
    mark = cv.color(ROAD, 2.2, 4)
    for z0 in np.arange(2.0 + rng.uniform(0, 6), zend, 9.0):
        cv.ground(-0.08, 0.08, z0, min(z0 + 3.0, zend), ROAD, mark)
    for s in (-1, 1):
        cv.ground(s * (rw - 0.45), s * (rw - 0.3), 0.5, zend, ROAD, mark)
    # The far end of the street: a row of buildings or trees across the whole width.
    if rng.random() < 0.75:
        x = -120.0
        while x < 120.0:
            wb = rng.uniform(8, 25)
            hb = rng.uniform(*cv.style.building_height)
            cv.box(x, x + wb, 0, hb, zend, BUILDING, cv.color(BUILDING, 0.9))
            x += wb
    else:
        pts = [cv.proj(-150, 0, zend)]
        for x in np.linspace(-150, 150, 40):
            pts.append(cv.proj(x, rng.uniform(4, 12), zend))
        pts.append(cv.proj(150, 0, zend))
        cv.poly(np.stack(pts), VEG, cv.color(VEG, 0.8))


def _draw_windows(cv: _Canvas, xf: float, z0: float, z1: float, hb: float, color: Color) -> None:
    if cv.ppm(z0) * 1.0 < 1.5:
        return
    dark = tuple(int(c * 0.45) for c in color)
    rng = cv.rng
    zs = np.arange(z0 + 1.0, z1 - 1.2, rng.uniform(2.5, 4.0))
    ys = np.arange(rng.uniform(1.5, 3.5), hb - 1.5, rng.uniform(2.8, 3.6))
    for z in zs:
        if cv.ppm(z) < 1.2:
            break
        for y in ys:
            cv.paint(cv.proj(xf, [y, y, y + 1.4, y + 1.4], [z, z + 1.2, z + 1.2, z]), dark)


def _draw_facades(cv: _Canvas, scene: dict) -> None:
    rng, st = cv.rng, cv.style
    kinds = list(st.facade_probs)
    probs = np.array([st.facade_probs[k] for k in kinds])
    probs = probs / probs.sum()
    for s in (-1, 1):
        xf = s * scene["facade"][s]
        segs = []
        z = 0.5
        while z < scene["zend"]:
            length = rng.uniform(8, 30)
            segs.append((z, min(z + length, scene["zend"]), kinds[int(rng.choice(len(kinds), p=probs))]))
            z += length
        shade = 0.78 if s < 0 else 0.92  # light from the right
        for z0, z1, kind in reversed(segs):  # far to near
            if kind in ("wall", "fence"):
                # something behind the low wall / fence
                back = BUILDING if rng.random() < 0.5 else VEG
                xb = xf + s * rng.uniform(2, 6)
                if back == BUILDING:
                    hb = rng.uniform(*st.building_height)
                    cv.side(xb, 0, hb, z0, z1, BUILDING, cv.color(BUILDING, shade))
                else:
                    _veg_mass(cv, xb, z0, z1, rng.uniform(3, 8), shade)
                hw = rng.uniform(1.2, 3.0) if kind == "wall" else rng.uniform(1.0, 2.0)
                lab = WALL if kind == "wall" else FENCE
                col = cv.color(lab, shade)
                cv.side(xf, 0, hw, z0, z1, lab, col)
                if kind == "fence":  # posts and a rail
                    dark = tuple(int(c * 0.6) for c in col)
                    for zp in np.arange(z0, z1, 2.0):
                        p0, p1 = cv.proj(xf, 0, zp), cv.proj(xf, hw, zp)
                        cv.line(p0, p1, cv.ppm(zp) * 0.08, FENCE, dark)
                    cv.line(cv.proj(xf, hw * 0.8, z0), cv.proj(xf, hw * 0.8, z1), 1, FENCE, dark)
            elif kind == "building":
                hb = rng.uniform(*st.building_height)
                col = cv.color(BUILDING, shade)
                front = tuple(int(c * 0.8) for c in col)
                cv.box(min(xf, xf + s * 15), max(xf, xf + s * 15), 0, hb, z0, BUILDING, front)
                cv.side(xf, 0, hb, z0, z1, BUILDING, col)
                _draw_windows(cv, xf, z0, z1, hb, col)
            elif kind == "veg":
                _veg_mass(cv, xf, z0, z1, rng.uniform(3, 10), shade)


def _veg_mass(cv: _Canvas, xf: float, z0: float, z1: float, height: float, shade: float) -> None:
    """A hedge / row of tree crowns in the plane X = xf with a bumpy top."""
    n = max(3, int((z1 - z0) / 1.5))
    zs = np.linspace(z0, z1, n)
    tops = height * (1 + 0.25 * np.sin(np.arange(n) * 1.7 + cv.rng.uniform(0, 6))) \
        + cv.rng.uniform(-0.5, 0.5, n)
    pts = np.concatenate([cv.proj(xf, 0, zs[::-1]), cv.proj(xf, tops, zs)])
    cv.poly(pts, VEG, cv.color(VEG, shade))


# objects ------------------------------------------------------------------------------------

def _vehicle(cv: _Canvas, x: float, z: float, lab: int, size: tuple[float, float, float]) -> None:
    """A box vehicle seen from behind/front with its inner side face visible."""
    w, hgt, length = size
    col = cv.color(lab)
    sidecol = tuple(int(c * 0.8) for c in col)
    dark = cv.color(CAR, 0.25, 2) if lab != CAR else tuple(int(c * 0.25) for c in col)
    glass = tuple(int(c * 0.35 + 40) for c in col)
    xs = x - w / 2 if x > 0 else x + w / 2  # the side facing the camera axis
    body_low = 0.25
    if lab == CAR:
        cv.side(xs, body_low, hgt * 0.6, z, z + length, lab, sidecol)
        cv.side(xs, hgt * 0.6, hgt, z + length * 0.25, z + length * 0.75, lab, glass)
        for zw in (z + 0.7, z + length - 0.7):  # wheels
            cv.disc(cv.proj(xs, 0.32, zw), 0.32 * cv.ppm(zw), lab, dark)
        cv.box(x - w / 2, x + w / 2, body_low, hgt * 0.6, z, lab, col)
        cv.poly(cv.proj([x - w / 2, x + w / 2, x + w * 0.38, x - w * 0.38],
                        [hgt * 0.6, hgt * 0.6, hgt, hgt], z), lab, col)
        cv.paint(cv.proj([x - w * 0.4, x + w * 0.4, x + w * 0.32, x - w * 0.32],
                         [hgt * 0.63, hgt * 0.63, hgt * 0.93, hgt * 0.93], z), glass)
        for sx in (-1, 1):
            cv.box(x + sx * w * 0.45, x + sx * w * 0.3, 0, body_low + 0.05, z, lab, dark)
            lamp = (200, 30, 30) if cv.style is SOURCE_STYLE else (150, 50, 45)
            cv.paint(cv.proj([x + sx * w * 0.45, x + sx * w * 0.3, x + sx * w * 0.3, x + sx * w * 0.45],
                             [hgt * 0.45, hgt * 0.45, hgt * 0.55, hgt * 0.55], z), lamp)
        return
    # trucks, buses, trains: tall boxes
    cv.side(xs, body_low, hgt, z, z + length, lab, sidecol)
    for zw in (z + 1.0, z + length - 1.2):
        cv.disc(cv.proj(xs, 0.45, zw), 0.45 * cv.ppm(zw), lab, dark)
    if lab in (BUS, TRAIN):  # window band along the side and on the back
        cv.paint(cv.proj(xs, [hgt * 0.5, hgt * 0.5, hgt * 0.85, hgt * 0.85],
                         [z + 0.5, z + length - 0.5, z + length - 0.5, z + 0.5]), glass)
    if lab == TRUCK:  # a cab in front of a cargo box, with a visible cab side
        cab = tuple(int(c) for c in cv.color(TRUCK))
        cv.side(xs, body_low, hgt * 0.75, z + length - 2.2, z + length, lab, tuple(int(c * 0.8) for c in cab))
    cv.box(x - w / 2, x + w / 2, body_low, hgt, z, lab, col)
    cv.box(x - w / 2, x - w / 2 + 0.5, 0, body_low, z, lab, dark)
    cv.box(x + w / 2 - 0.5, x + w / 2, 0, body_low, z, lab, dark)
    if lab in (BUS, TRAIN):
        cv.paint(cv.proj([x - w * 0.42, x + w * 0.42, x + w * 0.42, x - w * 0.42],
                         [hgt * 0.5, hgt * 0.5, hgt * 0.88, hgt * 0.88], z), glass)
    if lab == TRAIN:  # pantograph
        cv.line(cv.proj(x, hgt, z + 3), cv.proj(x, hgt + 0.8, z + 4), 1, TRAIN, dark)


def _person(cv: _Canvas, x: float, z: float, lab: int = PERSON, seated: float = 0.0,
            height: float | None = None) -> None:
    """A standing (or, with ``seated`` = saddle height, riding) person; all pixels ``lab``."""
    rng = cv.rng
    hp = height if height is not None else rng.uniform(*cv.style.person_height)
    shirt, trousers = cv.color(lab), cv.color(lab, 0.55)
    skin = (224, 172, 140) if cv.style is SOURCE_STYLE else (170, 140, 120)
    skin = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in skin)
    hw = 0.2 * hp / 1.75
    if seated <= 0:
        hip = 0.48 * hp
        stride = rng.uniform(0.0, 0.25)
        for sx in (-1, 1):  # legs
            cv.poly(cv.proj([x + sx * 0.02, x + sx * (hw * 0.9), x + sx * (hw * 0.3 + stride), x + sx * (stride)],
                            [hip, hip, 0, 0], z), lab, trousers)
        base = hip
    else:
        base = seated
        cv.poly(cv.proj([x - hw, x + hw * 0.6, x + hw * 0.9, x + hw * 0.4],
                        [base + 0.05, base + 0.05, base - 0.5, base - 0.5], z), lab, trousers)
    top = base + 0.36 * hp
    cv.poly(cv.proj([x - hw, x + hw, x + hw * 1.05, x - hw * 1.05], [base, base, top, top], z), lab, shirt)
    for sx in (-1, 1):  # arms
        cv.line(cv.proj(x + sx * hw, top - 0.03, z), cv.proj(x + sx * (hw + 0.08), base + 0.05, z),
                cv.ppm(z) * 0.08, lab, shirt)
    head_r = 0.11 * hp / 1.75
    cv.disc(cv.proj(x, top + head_r * 1.1, z), head_r * cv.ppm(z), lab, skin)
    if lab == RIDER and rng.random() < 0.6:  # helmet
        cv.disc(cv.proj(x, top + head_r * 1.4, z), head_r * 0.9 * cv.ppm(z), lab, cv.color(lab, 0.9))


def _two_wheeler(cv: _Canvas, x: float, z: float, lab: int, direction: int) -> float:
    """A bicycle or motorcycle in side view; returns the saddle height (metres)."""
    ppm = cv.ppm(z)
    col = cv.color(lab)
    tyre = (25, 25, 25) if cv.style is SOURCE_STYLE else (40, 40, 42)
    if lab == BICYCLE:
        r, base, saddle = 0.34, 1.05, 0.95
    else:
        r, base, saddle = 0.32, 1.4, 0.85
    xb, xf = x - direction * base / 2, x + direction * base / 2
    thick = max(1, int(round(ppm * (0.05 if lab == BICYCLE else 0.12))))
    for xx in (xb, xf):
        cv.disc(cv.proj(xx, r, z), r * ppm, lab, tyre, thickness=thick)
    if lab == BICYCLE:
        pb, pf, ps = cv.proj(xb, r, z), cv.proj(xf, r, z), cv.proj(x - direction * 0.1, saddle, z)
        ph = cv.proj(xf - direction * 0.12, saddle + 0.1, z)
        pc = cv.proj(x, r, z)
        for a, b in ((pb, ps), (pb, pc), (pc, ps), (ps, ph), (pc, ph), (ph, pf)):
            cv.line(a, b, ppm * 0.05, lab, col)
    else:
        cv.poly(cv.proj([xb + direction * 0.2, xf - direction * 0.1, xf - direction * 0.25, x, xb],
                        [r + 0.1, r + 0.2, saddle + 0.25, saddle + 0.05, saddle], z), lab, col)
        cv.disc(cv.proj(x, r + 0.1, z), 0.2 * ppm, lab, (60, 60, 60))
    return saddle


def _pole(cv: _Canvas, x: float, z: float, s: int) -> None:
    rng, st = cv.rng, cv.style
    hp = rng.uniform(4.0, 8.5)
    wp = rng.uniform(0.08, 0.15)
    col = cv.color(POLE)
    cv.box(x - wp / 2, x + wp / 2, 0, hp, z, POLE, col)
    u = rng.random()
    if u < st.p_light:
        # an arm over the road with a signal head at its end, or a head on the pole
        if rng.random() < 0.5:
            arm = rng.uniform(2.0, 4.5)
            xa = x - s * arm
            cv.line(cv.proj(x, hp - 0.3, z), cv.proj(xa, hp - 0.3, z), cv.ppm(z) * 0.12, POLE, col)
            hx, hy = xa, hp - 0.3
        else:
            hx, hy = x - s * 0.3, hp - 0.2
        hw, hh = 0.35, 1.0
        box = cv.color(LIGHT)
        cv.box(hx - hw / 2, hx + hw / 2, hy - hh, hy, z - 0.05, LIGHT, box)
        lit = int(rng.integers(3))
        for i, c in enumerate(((230, 30, 20), (240, 170, 0), (30, 220, 80))):
            c = c if i == lit else tuple(int(v * 0.25) for v in c)
            cv.disc(cv.proj(hx, hy - hh * (0.2 + 0.3 * i), z - 0.1), 0.1 * cv.ppm(z), LIGHT, c)
    elif u < st.p_light + st.p_sign:
        ys = rng.uniform(2.2, min(hp, 3.6))
        size = rng.uniform(0.5, 0.9)
        col = cv.color(SIGN)
        sx = x - s * size * 0.5
        shape = int(rng.integers(3))
        if shape == 0:
            cv.disc(cv.proj(sx, ys, z - 0.05), size / 2 * cv.ppm(z), SIGN, col)
        elif shape == 1:
            cv.box(sx - size / 2, sx + size / 2, ys - size / 2, ys + size / 2, z - 0.05, SIGN, col)
        else:
            cv.poly(cv.proj([sx - size / 2, sx + size / 2, sx], [ys + size / 2, ys + size / 2, ys - size / 2],
                            z - 0.05), SIGN, col)
        inner = (240, 240, 240) if cv.style is SOURCE_STYLE else (200, 200, 196)
        cv.disc(cv.proj(sx, ys, z - 0.06), size * 0.22 * cv.ppm(z), SIGN, inner)
    elif rng.random() < 0.5:  # street lamp
        arm = rng.uniform(1.0, 2.0)
        cv.line(cv.proj(x, hp, z), cv.proj(x - s * arm, hp + 0.2, z), cv.ppm(z) * 0.1, POLE, col)


def _tree(cv: _Canvas, x: float, z: float) -> None:
    rng = cv.rng
    th = rng.uniform(1.8, 3.5)
    trunk = cv.color(VEG, 0.5)
    trunk = (int(trunk[0] * 1.2 + 20), int(trunk[1] * 0.8), int(trunk[2] * 0.6))
    cv.box(x - 0.15, x + 0.15, 0, th + 0.5, z + 0.1, VEG, trunk)
    r = rng.uniform(1.2, 3.0)
    col = cv.color(VEG)
    for _ in range(4):
        dx, dy = rng.normal(0, r * 0.35, 2)
        cv.disc(cv.proj(x + dx, th + r * 0.8 + dy, z), r * rng.uniform(0.6, 0.9) * cv.ppm(z),
                VEG, tuple(int(c * rng.uniform(0.85, 1.1)) for c in col))


def _static(cv: _Canvas, x: float, z: float) -> None:
    """Void street furniture (Cityscapes 'static': bins, boxes, planters)."""
    rng = cv.rng
    w, hgt = rng.uniform(0.4, 1.2), rng.uniform(0.6, 1.3)
    cv.box(x - w / 2, x + w / 2, 0, hgt, z, STATIC, cv.color(STATIC))


def _place_objects(cv: _Canvas, scene: dict) -> list[tuple[float, Callable[[], None]]]:
    """Sample every object of the scene; returns (depth, draw) pairs."""
    rng, st = cv.rng, cv.style
    rw, sw, zend = scene["road_half"], scene["sidewalk"], scene["zend"]
    objs: list[tuple[float, Callable[[], None]]] = []
    lanes = [-rw * 0.5, rw * 0.5]
    lane_busy: dict[float, list[tuple[float, float]]] = {ln: [] for ln in lanes + [-rw + 1.1, rw - 1.1]}
    zmax = min(zend - 2, 90.0)

    def lane_slot(lane: float, length: float, zmin: float = 4.0) -> float | None:
        for _ in range(6):
            z = zmin + (zmax - zmin) * rng.random() ** 0.9
            if all(z + length + 1.5 < a or z > b + 1.5 for a, b in lane_busy[lane]):
                lane_busy[lane].append((z, z + length))
                return z
        return None

    def add(z, fn, *a, **k):
        objs.append((z, lambda: fn(cv, *a, **k)))

    sizes = {
        CAR: lambda: tuple(np.array([1.8, 1.5, 4.3]) * rng.uniform(*st.car_scale)),
        TRUCK: lambda: (2.5, rng.uniform(2.8, 3.9), rng.uniform(6.0, 10.0)),
        BUS: lambda: (2.55, rng.uniform(3.0, 3.4), rng.uniform(10.0, 13.0)),
    }
    if rng.random() < st.p_train:  # a tram on the centre of the street, placed first
        z = rng.uniform(8, 40)
        length = rng.uniform(20, 30)
        add(z, _vehicle, rng.normal(0, 0.3), z, TRAIN, (2.6, rng.uniform(3.4, 3.9), length))
        for ln in lanes:
            lane_busy[ln].append((z, z + length))
    for lab, lam in ((CAR, st.n_cars), (TRUCK, st.n_trucks), (BUS, st.n_buses)):
        for _ in range(_poisson(rng, lam)):
            parked = lab == CAR and rng.random() < 0.45
            lane = (rw - 1.1 if rng.random() < 0.5 else -rw + 1.1) if parked else lanes[int(rng.integers(2))]
            size = sizes[lab]()
            z = lane_slot(lane, size[2], 5.0 if lab == CAR else 10.0)
            if z is not None:
                add(z, _vehicle, lane + rng.normal(0, 0.15), z, lab, size)
    for _ in range(_poisson(rng, st.n_persons)):
        s = 1 if rng.random() < 0.5 else -1
        z = 3.5 + 50 * rng.random() ** 1.5
        if rng.random() < 0.15:  # crossing the road
            x = rng.uniform(-rw, rw)
        else:
            x = s * (rw + rng.uniform(0.4, sw - 0.2))
        add(z, _person, x, z)
        if rng.random() < 0.3:  # groups
            add(z + 0.3, _person, x + rng.uniform(0.5, 0.8), z + 0.3)
    for lab, lam in ((BICYCLE, st.n_cyclists), (MOTO, st.n_motorcyclists)):
        for _ in range(_poisson(rng, lam)):
            lane = rw - 1.1 if rng.random() < 0.6 else lanes[int(rng.integers(2))]
            z = lane_slot(lane, 2.0, 5.0)
            if z is None:
                continue
            x = lane + rng.normal(0, 0.2)
            direction = 1 if rng.random() < 0.5 else -1

            def ride(cv, x=x, z=z, lab=lab, direction=direction):
                saddle = _two_wheeler(cv, x, z, lab, direction)
                _person(cv, x - direction * 0.1, z - 0.05, RIDER, seated=saddle)
            objs.append((z, lambda f=ride: f(cv)))
    for lab, lam in ((BICYCLE, st.n_parked_bikes), (MOTO, st.n_parked_motos)):
        for _ in range(_poisson(rng, lam)):
            s = 1 if rng.random() < 0.5 else -1
            z = rng.uniform(4, 40)
            add(z, _two_wheeler, s * (rw + rng.uniform(0.6, sw)), z, lab, 1 if rng.random() < 0.5 else -1)
    for s in (-1, 1):  # poles along the outer edge of each sidewalk
        z = rng.uniform(8, 24)
        while z < min(zmax, 70.0):
            add(z, _pole, s * (rw + sw - 0.3), z, s)
            z += rng.uniform(*st.pole_spacing)
    for _ in range(_poisson(rng, st.n_trees)):
        s = 1 if rng.random() < 0.5 else -1
        z = rng.uniform(5, 60)
        fac = scene["facade"][s]
        x = s * rng.uniform(rw + sw - 0.5, max(rw + sw - 0.4, fac - 1.0))
        add(z, _tree, x, z)
    for _ in range(_poisson(rng, st.n_static)):
        s = 1 if rng.random() < 0.5 else -1
        z = rng.uniform(4, 40)
        add(z, _static, s * (rw + rng.uniform(0.5, sw)), z)
    return objs


def _draw_ego(cv: _Canvas) -> None:
    rng = cv.rng
    hood = cv.h * rng.uniform(0.07, 0.13)
    xs = np.linspace(-0.05, 1.05, 24) * cv.w
    ys = cv.h - hood + (hood * 0.5) * ((xs - cv.w / 2) / (cv.w / 2)) ** 2
    pts = np.concatenate([np.stack([xs, ys], 1), [[cv.w * 1.05, cv.h + 2], [-cv.w * 0.05, cv.h + 2]]])
    col = cv.color(EGO)
    cv.poly(pts, EGO, col)
    # a reflection of the sky on the bonnet
    refl = tuple(int(c * 0.5 + 60) for c in col)
    cv.paint(np.stack([xs[6:18], ys[6:18] + 2], 1).tolist() + [[xs[17], ys[17] + 4], [xs[6], ys[6] + 4]], refl)


def _finish(cv: _Canvas) -> np.ndarray:
    """Domain-specific image formation: returns the final uint8 RGB image."""
    rng, st = cv.rng, cv.style
    img = cv.rgb.astype(np.float32)
    h, w = cv.h, cv.w
    if not st.textured:
        # game: flat, saturated; only a global exposure change and faint noise
        img *= rng.uniform(0.9, 1.1)
        mean = img.mean(axis=2, keepdims=True)
        img = mean + (img - mean) * 1.15
        img += rng.normal(0, 1.5, (h, w, 1)).astype(np.float32)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)
    lab = cv.label
    fine = rng.standard_normal((h, w, 1), dtype=np.float32)
    low = rng.standard_normal((h // 8 + 2, w // 8 + 2), dtype=np.float32)
    low = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)[:, :, None]
    img += _TEX_FINE_LUT[lab][:, :, None] * fine + _TEX_LOW_LUT[lab][:, :, None] * low
    # lens and sensor: blur, lower contrast, colour cast, vignetting, noise
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.1))
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = mean + (img - mean) * rng.uniform(0.65, 0.85)
    gains = np.array([1.0, 1.0, 1.0], np.float32) + rng.normal(0, 0.05, 3).astype(np.float32)
    gains += np.array([0.04, 0.0, -0.05], np.float32) * rng.uniform(-1, 1.5)  # warm / cool cast
    img *= gains
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    img *= (1.0 - rng.uniform(0.15, 0.35) * r2 / 2)[:, :, None]
    img += rng.normal(0, rng.uniform(2.0, 5.0), (h, w, 3)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_image(seed: int, domain: int, index: int, size: tuple[int, int] = (256, 128)
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: (RGB H x W x 3 uint8, labelIds H x W uint8). ``domain`` 0 = source."""
    rng = np.random.default_rng([seed, domain, index])
    style = SOURCE_STYLE if domain == DOMAIN_SOURCE else TARGET_STYLE
    width, height = size
    cv = _Canvas(width, height, style, rng)
    rw, sw = rng.uniform(*style.road_half), rng.uniform(*style.sidewalk)
    scene = {
        "road_half": rw, "sidewalk": sw, "zend": rng.uniform(45.0, 160.0),
        "sidewalk_color": cv.color(SIDEWALK),
        "facade": {s: rw + sw + rng.uniform(*style.setback) for s in (-1, 1)},
    }
    _draw_background(cv, scene)
    _draw_facades(cv, scene)
    objs = _place_objects(cv, scene)
    for _, draw in sorted(objs, key=lambda o: -o[0]):
        draw()
    if rng.random() < style.p_ego:
        _draw_ego(cv)
    image = _finish(cv)
    label = cv.label
    if style.roi_border:
        b = style.roi_border
        label[:, :b] = OUT_OF_ROI
        label[:, -b:] = OUT_OF_ROI
        label[-b:, :] = OUT_OF_ROI
    return image, label


# --------------------------------------------------------------------------------------------
# Data set writer
# --------------------------------------------------------------------------------------------

def _target_rel(split: str, index: int) -> tuple[str, str]:
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{CITY_FRAME:06d}"
    return (f"cityscapes/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
            f"cityscapes/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png")


def _source_rel(index: int) -> tuple[str, str]:
    return f"gta5/images/{index + 1:05d}.png", f"gta5/labels/{index + 1:05d}.png"


def _freqs_from_counts(counts: np.ndarray, protocol: Protocol) -> dict[str, float]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    train_ids = protocol.lut[np.arange(len(counts))]
    out = {}
    for c, name in enumerate(protocol.class_names):
        out[name] = float(counts[train_ids == c].sum() / total) if total else 0.0
    out["ignore"] = float(counts[train_ids == IGNORE_INDEX].sum() / total) if total else 0.0
    return out


def class_frequencies(label_paths: Iterable[Path], protocol: Protocol = CITYSCAPES_19) -> dict[str, float]:
    """Fraction of all pixels (labelled and ignored) per class name, plus ``"ignore"``.

    The label files hold raw ids (labelIds for Cityscapes/GTA5/synthetic data).
    """
    counts = np.zeros(256, dtype=np.int64)
    for path in label_paths:
        raw = np.asarray(Image.open(path))
        counts += np.bincount(raw.ravel().astype(np.int64).clip(0, 255), minlength=256)[:256]
    return _freqs_from_counts(counts, protocol)


def _params(seed: int, num_source: int, num_train: int, num_val: int, size: tuple[int, int]) -> dict:
    return {"generator": "cbst.synthetic", "version": SYNTHETIC_VERSION, "seed": int(seed),
            "size": [int(size[0]), int(size[1])],
            "counts": {"source": int(num_source), "train": int(num_train), "val": int(num_val)}}


def _all_paths(params: dict) -> list[str]:
    c = params["counts"]
    paths = [p for i in range(c["source"]) for p in _source_rel(i)]
    for split in ("train", "val"):
        paths += [p for i in range(c[split]) for p in _target_rel(split, i)]
    return paths


def make_synthetic(out: str | Path, seed: int = 0, *, num_source: int = 400, num_train: int = 200,
                   num_val: int = 100, size: tuple[int, int] = (256, 128), progress: bool = True) -> dict:
    """Render the synthetic benchmark into ``out``; returns the summary written to synthetic.json.

    Refuses (``SyntheticExistsError``) to write into a non-empty folder that is not a synthetic
    benchmark of the same version, seed and parameters; returns the stored summary without
    rendering if such a benchmark is already complete there; finishes an interrupted one.
    """
    out = Path(out)
    width, height = int(size[0]), int(size[1])
    if width < 32 or height < 16:
        raise ValueError(f"size must be at least 32x16, got {width}x{height}")
    for name, n in (("num_source", num_source), ("num_train", num_train), ("num_val", num_val)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    params = _params(seed, num_source, num_train, num_val, (width, height))
    summary_path = out / SUMMARY_NAME
    if out.exists() and not out.is_dir():
        raise SyntheticExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not summary_path.is_file():
            raise SyntheticExistsError(
                f"{out}: folder is not empty and holds no {SUMMARY_NAME}; refusing to write a "
                f"synthetic benchmark into it (choose an empty or new folder)")
        try:
            old = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise SyntheticExistsError(f"{summary_path}: unreadable ({exc}); refusing to overwrite") from None
        old_params = {k: old.get(k) for k in params}
        if old_params != params:
            diff = ", ".join(f"{k}: {old_params[k]!r} there, {params[k]!r} requested"
                             for k in params if old_params[k] != params[k])
            raise SyntheticExistsError(
                f"{out}: holds a different synthetic benchmark ({diff}); use another folder or "
                f"delete this one")
        if old.get("complete") and all((out / p).is_file() for p in _all_paths(params)):
            if progress:
                print(f"{out}: synthetic benchmark v{SYNTHETIC_VERSION} (seed {seed}) already complete; "
                      "nothing to do", file=sys.stderr)
            return old
    out.mkdir(parents=True, exist_ok=True)
    write_json(summary_path, {**params, "complete": False})
    write_text(out / "VERSION", f"cbst-synthetic {SYNTHETIC_VERSION}\n")

    palette = cityscapes_palette()
    start = time.perf_counter()
    jobs = [(DOMAIN_SOURCE, i, _source_rel(i), "source") for i in range(num_source)]
    jobs += [(DOMAIN_TARGET_TRAIN, i, _target_rel("train", i), "target_train") for i in range(num_train)]
    jobs += [(DOMAIN_TARGET_VAL, i, _target_rel("val", i), "target_val") for i in range(num_val)]
    counts = {k: np.zeros(256, dtype=np.int64) for k in ("source", "target_train", "target_val")}
    for n, (domain, i, (img_rel, lab_rel), key) in enumerate(jobs, 1):
        image, label = render_image(seed, domain, i, (width, height))
        write_png(out / img_rel, image)
        write_png(out / lab_rel, label, palette=palette if domain == DOMAIN_SOURCE else None)
        counts[key] += np.bincount(label.ravel(), minlength=256)
        if progress and (n % 50 == 0 or n == len(jobs)):
            print(f"  rendered {n}/{len(jobs)} images ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    summary = {
        **params, "complete": True,
        "domains": {
            "source": {"name": "game", "layout": "gta5", "root": "gta5", "images": num_source},
            "target": {"name": "camera", "layout": "cityscapes", "root": "cityscapes",
                       "splits": {"train": num_train, "val": num_val},
                       "cities": {"train": list(TRAIN_CITIES), "val": list(VAL_CITIES)}},
        },
        "render_seconds": round(seconds, 2),
        "class_frequencies": {k: _freqs_from_counts(v, CITYSCAPES_19) for k, v in counts.items()},
    }
    write_json(summary_path, summary)
    return summary


def frequency_table(summary: dict) -> str:
    """A plain-text table of the per-class pixel frequencies (%) of every domain in ``summary``."""
    freqs = summary["class_frequencies"]
    keys = list(freqs)
    names = list(CITYSCAPES_19.class_names) + ["ignore"]
    head = f"{'class':<14}" + "".join(f"{k:>14}" for k in keys)
    rows = [head, "-" * len(head)]
    for name in names:
        rows.append(f"{name:<14}" + "".join(f"{100 * freqs[k].get(name, 0.0):>13.3f}%" for k in keys))
    return "\n".join(rows)
