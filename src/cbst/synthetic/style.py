"""The two domains' styles: layout statistics, colour palettes and texture strengths.

Everything that makes the "game" source differ from the "camera" target lives here, as data;
the drawing code is shared and reads it through ``Canvas.style``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbst.synthetic.classes import (
    BICYCLE,
    BUILDING,
    BUS,
    CAR,
    EGO,
    FENCE,
    LIGHT,
    MOTO,
    PERSON,
    POLE,
    RIDER,
    ROAD,
    SIDEWALK,
    SIGN,
    SKY,
    STATIC,
    TERRAIN,
    TRAIN,
    TRUCK,
    VEG,
    WALL,
    Color,
)


@dataclass(frozen=True)
class Style:
    """Everything that differs between the two domains (layout statistics and appearance)."""

    name: str
    horizon: tuple[float, float]  # horizon row as a fraction of the height
    cam_height: tuple[float, float]  # metres
    focal: tuple[float, float]  # focal length as a fraction of the width
    road_half: tuple[float, float]  # metres
    sidewalk: tuple[float, float]  # metres
    setback: tuple[float, float]  # terrain strip between sidewalk and facades, metres
    facade_probs: dict[str, float]  # building / wall / fence / veg / open
    building_height: tuple[float, float]
    n_cars: float  # Poisson means per image
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
    pole_spacing: tuple[float, float]  # metres between poles along each side
    p_light: float  # a pole carries a traffic light
    p_sign: float  # a pole carries a traffic sign
    person_height: tuple[float, float]
    car_scale: tuple[float, float]
    p_ego: float  # ego-vehicle hood at the bottom (void)
    roi_border: int  # out-of-roi border (void), pixels
    colors: dict[int, list[Color]]  # per labelId: colour modes of the domain
    jitter: float  # per-instance colour jitter (std, 0-255 scale)
    textured: bool


_SOURCE_COLORS: dict[int, list[Color]] = {
    ROAD: [(78, 76, 88)],
    SIDEWALK: [(176, 146, 156), (168, 160, 150)],
    BUILDING: [(176, 120, 84), (200, 170, 120), (150, 150, 165), (190, 100, 80)],
    WALL: [(196, 190, 160)],
    FENCE: [(134, 96, 58), (110, 120, 130)],
    POLE: [(120, 120, 128)],
    LIGHT: [(34, 38, 30)],
    SIGN: [(235, 30, 30), (30, 80, 230), (245, 215, 0)],
    VEG: [(40, 156, 36), (70, 140, 20)],
    TERRAIN: [(150, 196, 70)],
    SKY: [(80, 160, 250)],
    PERSON: [(210, 40, 40), (40, 60, 200), (240, 200, 40), (30, 30, 30), (230, 230, 230)],
    RIDER: [(250, 120, 0), (20, 160, 160), (200, 0, 150)],
    CAR: [(200, 20, 20), (20, 40, 190), (235, 235, 235), (30, 30, 35), (160, 160, 170), (0, 140, 60)],
    TRUCK: [(230, 230, 220), (200, 90, 20), (60, 90, 160)],
    BUS: [(240, 190, 10), (210, 40, 30)],
    TRAIN: [(200, 40, 40), (230, 230, 230)],
    MOTO: [(20, 20, 20), (200, 0, 0), (0, 60, 200)],
    BICYCLE: [(40, 200, 80), (230, 40, 40), (30, 30, 30)],
    STATIC: [(90, 140, 60), (130, 110, 90)],
    EGO: [(40, 40, 48)],
}

# Real-camera colour statistics: same families (a class stays recognisable), other means and
# spreads, mostly greyer and darker; the sky is an overcast white-blue as in most Cityscapes frames.
_CAMERA_COLORS: dict[int, list[Color]] = {
    ROAD: [(116, 112, 110), (100, 100, 104)],
    SIDEWALK: [(150, 144, 138), (140, 128, 124)],
    BUILDING: [(132, 122, 110), (160, 150, 134), (110, 108, 112), (150, 110, 90)],
    WALL: [(160, 152, 136), (130, 130, 124)],
    FENCE: [(110, 100, 86), (90, 96, 96)],
    POLE: [(92, 94, 94), (70, 74, 70)],
    LIGHT: [(46, 46, 42)],
    SIGN: [(190, 50, 40), (40, 80, 160), (210, 190, 60), (220, 220, 215)],
    VEG: [(78, 104, 50), (96, 116, 58), (60, 84, 44)],
    TERRAIN: [(128, 138, 86), (140, 132, 96)],
    SKY: [(196, 208, 220), (170, 192, 214)],
    PERSON: [(60, 60, 70), (130, 40, 50), (40, 50, 90), (180, 170, 150), (90, 80, 60)],
    RIDER: [(150, 80, 40), (40, 100, 100), (80, 80, 90)],
    CAR: [(120, 30, 30), (40, 50, 90), (190, 190, 186), (40, 40, 44), (130, 132, 136), (60, 80, 60)],
    TRUCK: [(190, 190, 182), (150, 90, 50), (70, 80, 110)],
    BUS: [(200, 200, 196), (150, 40, 40), (50, 70, 110)],
    TRAIN: [(210, 205, 190), (170, 60, 50)],
    MOTO: [(40, 40, 44), (140, 30, 30), (60, 70, 110)],
    BICYCLE: [(50, 50, 54), (120, 40, 40), (60, 100, 70)],
    STATIC: [(70, 90, 60), (110, 100, 90)],
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
    k: _shifted(_SOURCE_COLORS[k], v, CAMERA_SHIFT) for k, v in _CAMERA_COLORS.items()
}

SOURCE_STYLE = Style(
    name="game",
    horizon=(0.40, 0.54),
    cam_height=(1.2, 1.8),
    focal=(0.95, 1.1),
    road_half=(4.0, 7.5),
    sidewalk=(1.5, 3.5),
    setback=(0.0, 7.0),
    facade_probs={"building": 0.45, "wall": 0.12, "fence": 0.08, "veg": 0.2, "open": 0.15},
    building_height=(6.0, 22.0),
    n_cars=4.0,
    n_trucks=1.4,
    n_buses=0.4,
    p_train=0.15,
    n_persons=2.0,
    n_cyclists=0.6,
    n_motorcyclists=0.6,
    n_parked_bikes=0.8,
    n_parked_motos=0.5,
    n_trees=3.0,
    n_static=0.8,
    pole_spacing=(16.0, 36.0),
    p_light=0.35,
    p_sign=0.35,
    person_height=(1.65, 1.95),
    car_scale=(0.95, 1.15),
    p_ego=0.1,
    roi_border=0,
    colors=_SOURCE_COLORS,
    jitter=10.0,
    textured=False,
)

TARGET_STYLE = Style(
    name="camera",
    horizon=(0.32, 0.46),
    cam_height=(1.1, 1.4),
    focal=(1.05, 1.25),
    road_half=(3.0, 6.0),
    sidewalk=(2.0, 4.5),
    setback=(0.0, 4.0),
    facade_probs={"building": 0.55, "wall": 0.1, "fence": 0.1, "veg": 0.2, "open": 0.05},
    building_height=(8.0, 26.0),
    n_cars=6.0,
    n_trucks=0.25,
    n_buses=0.25,
    p_train=0.12,
    n_persons=4.5,
    n_cyclists=0.9,
    n_motorcyclists=0.25,
    n_parked_bikes=1.2,
    n_parked_motos=0.2,
    n_trees=4.0,
    n_static=1.5,
    pole_spacing=(14.0, 32.0),
    p_light=0.35,
    p_sign=0.45,
    person_height=(1.55, 1.9),
    car_scale=(0.9, 1.05),
    p_ego=1.0,
    roi_border=2,
    colors=_TARGET_COLORS,
    jitter=18.0,
    textured=True,
)

# Texture amplitudes (target only): fine per-pixel grain and blotchy low-frequency variation.
_TEX_FINE = {
    ROAD: 10,
    SIDEWALK: 9,
    BUILDING: 8,
    WALL: 9,
    FENCE: 8,
    VEG: 24,
    TERRAIN: 16,
    SKY: 2,
    PERSON: 6,
    RIDER: 6,
    CAR: 4,
    TRUCK: 5,
    BUS: 4,
    TRAIN: 4,
    POLE: 4,
    STATIC: 8,
    EGO: 3,
}
_TEX_LOW = {ROAD: 8, SIDEWALK: 8, BUILDING: 10, WALL: 8, FENCE: 6, VEG: 16, TERRAIN: 14, SKY: 10, STATIC: 6}


def _lut(table: dict[int, float]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    for k, v in table.items():
        lut[k] = v
    return lut


TEX_FINE_LUT, TEX_LOW_LUT = _lut(_TEX_FINE), _lut(_TEX_LOW)
