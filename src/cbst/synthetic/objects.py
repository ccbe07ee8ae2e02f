"""Street objects: vehicles, people, riders, two-wheelers, poles with lights and signs, trees.

``place_objects`` samples a scene's objects from the domain's style (counts, sizes, lanes
without overlaps) and returns them as (depth, draw) pairs for far-to-near drawing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cbst.synthetic.canvas import Canvas
from cbst.synthetic.classes import (
    BICYCLE,
    BUS,
    CAR,
    LIGHT,
    MOTO,
    PERSON,
    POLE,
    RIDER,
    SIGN,
    STATIC,
    TRAIN,
    TRUCK,
    VEG,
)
from cbst.synthetic.style import SOURCE_STYLE

# Version 1.2: thin classes are drawn larger than life so that a stride-8 network at 256x128 can
# learn them (docs/synthetic_benchmark.md, "Version 1.2"): every thin part is at least
# THIN_MIN_PX pixels thick, poles and bicycle frames are thicker, and signal heads and signs
# are bigger than real ones. The same sizes hold in both domains.
THIN_MIN_PX = 3.0
POLE_MIN_PX = 4.0  # poles: the class with the most pixels on thin parts
POLE_WIDTH = (0.25, 0.4)  # metres (real: 0.08-0.15)
LIGHT_HEAD = (0.6, 1.4)  # signal head width, height in metres (real: about 0.35 x 1.0)
SIGN_SIZE = (0.9, 1.4)  # metres (real: 0.5-0.9)
FRAME_WIDTH = 0.09  # bicycle frame tubes, metres
TYRE_WIDTH = {BICYCLE: 0.1, MOTO: 0.14}  # tyre ring thickness, metres


def _thick(cv: Canvas, metres: float, z: float) -> float:
    """The pixel thickness of a thin part ``metres`` wide at depth ``z``, at least THIN_MIN_PX."""
    return max(metres * cv.ppm(z), THIN_MIN_PX)


def _poisson(rng: np.random.Generator, lam: float) -> int:
    return int(rng.poisson(lam))


def _vehicle(cv: Canvas, x: float, z: float, lab: int, size: tuple[float, float, float]) -> None:
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
        cv.poly(
            cv.proj([x - w / 2, x + w / 2, x + w * 0.38, x - w * 0.38], [hgt * 0.6, hgt * 0.6, hgt, hgt], z),
            lab,
            col,
        )
        cv.paint(
            cv.proj(
                [x - w * 0.4, x + w * 0.4, x + w * 0.32, x - w * 0.32],
                [hgt * 0.63, hgt * 0.63, hgt * 0.93, hgt * 0.93],
                z,
            ),
            glass,
        )
        for sx in (-1, 1):
            cv.box(x + sx * w * 0.45, x + sx * w * 0.3, 0, body_low + 0.05, z, lab, dark)
            lamp = (200, 30, 30) if cv.style is SOURCE_STYLE else (150, 50, 45)
            cv.paint(
                cv.proj(
                    [x + sx * w * 0.45, x + sx * w * 0.3, x + sx * w * 0.3, x + sx * w * 0.45],
                    [hgt * 0.45, hgt * 0.45, hgt * 0.55, hgt * 0.55],
                    z,
                ),
                lamp,
            )
        return
    # trucks, buses, trains: tall boxes
    cv.side(xs, body_low, hgt, z, z + length, lab, sidecol)
    for zw in (z + 1.0, z + length - 1.2):
        cv.disc(cv.proj(xs, 0.45, zw), 0.45 * cv.ppm(zw), lab, dark)
    if lab in (BUS, TRAIN):  # window band along the side and on the back
        cv.paint(
            cv.proj(
                xs,
                [hgt * 0.5, hgt * 0.5, hgt * 0.85, hgt * 0.85],
                [z + 0.5, z + length - 0.5, z + length - 0.5, z + 0.5],
            ),
            glass,
        )
    if lab == TRUCK:  # a cab in front of a cargo box, with a visible cab side
        cab = tuple(int(c) for c in cv.color(TRUCK))
        cv.side(xs, body_low, hgt * 0.75, z + length - 2.2, z + length, lab, tuple(int(c * 0.8) for c in cab))
    cv.box(x - w / 2, x + w / 2, body_low, hgt, z, lab, col)
    cv.box(x - w / 2, x - w / 2 + 0.5, 0, body_low, z, lab, dark)
    cv.box(x + w / 2 - 0.5, x + w / 2, 0, body_low, z, lab, dark)
    if lab in (BUS, TRAIN):
        cv.paint(
            cv.proj(
                [x - w * 0.42, x + w * 0.42, x + w * 0.42, x - w * 0.42],
                [hgt * 0.5, hgt * 0.5, hgt * 0.88, hgt * 0.88],
                z,
            ),
            glass,
        )
    if lab == TRAIN:  # pantograph
        cv.line(cv.proj(x, hgt, z + 3), cv.proj(x, hgt + 0.8, z + 4), 1, TRAIN, dark)


def _person(
    cv: Canvas, x: float, z: float, lab: int = PERSON, seated: float = 0.0, height: float | None = None
) -> None:
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
            cv.poly(
                cv.proj(
                    [x + sx * 0.02, x + sx * (hw * 0.9), x + sx * (hw * 0.3 + stride), x + sx * (stride)],
                    [hip, hip, 0, 0],
                    z,
                ),
                lab,
                trousers,
            )
        base = hip
    else:
        base = seated
        cv.poly(
            cv.proj(
                [x - hw, x + hw * 0.6, x + hw * 0.9, x + hw * 0.4],
                [base + 0.05, base + 0.05, base - 0.5, base - 0.5],
                z,
            ),
            lab,
            trousers,
        )
    top = base + 0.36 * hp
    cv.poly(cv.proj([x - hw, x + hw, x + hw * 1.05, x - hw * 1.05], [base, base, top, top], z), lab, shirt)
    for sx in (-1, 1):  # arms
        cv.line(
            cv.proj(x + sx * hw, top - 0.03, z),
            cv.proj(x + sx * (hw + 0.08), base + 0.05, z),
            cv.ppm(z) * 0.08,
            lab,
            shirt,
        )
    head_r = 0.11 * hp / 1.75
    cv.disc(cv.proj(x, top + head_r * 1.1, z), head_r * cv.ppm(z), lab, skin)
    if lab == RIDER and rng.random() < 0.6:  # helmet
        cv.disc(cv.proj(x, top + head_r * 1.4, z), head_r * 0.9 * cv.ppm(z), lab, cv.color(lab, 0.9))


def _two_wheeler(cv: Canvas, x: float, z: float, lab: int, direction: int) -> float:
    """A bicycle or motorcycle in side view; returns the saddle height (metres)."""
    ppm = cv.ppm(z)
    col = cv.color(lab)
    tyre = (25, 25, 25) if cv.style is SOURCE_STYLE else (40, 40, 42)
    if lab == BICYCLE:
        r, base, saddle = 0.34, 1.05, 0.95
    else:
        r, base, saddle = 0.32, 1.4, 0.85
    xb, xf = x - direction * base / 2, x + direction * base / 2
    thick = int(round(_thick(cv, TYRE_WIDTH[lab], z)))
    for xx in (xb, xf):
        cv.disc(cv.proj(xx, r, z), r * ppm, lab, tyre, thickness=thick)
    if lab == BICYCLE:
        pb, pf, ps = cv.proj(xb, r, z), cv.proj(xf, r, z), cv.proj(x - direction * 0.1, saddle, z)
        ph = cv.proj(xf - direction * 0.12, saddle + 0.1, z)
        pc = cv.proj(x, r, z)
        for a, b in ((pb, ps), (pb, pc), (pc, ps), (ps, ph), (pc, ph), (ph, pf)):
            cv.line(a, b, _thick(cv, FRAME_WIDTH, z), lab, col)
    else:
        cv.poly(
            cv.proj(
                [xb + direction * 0.2, xf - direction * 0.1, xf - direction * 0.25, x, xb],
                [r + 0.1, r + 0.2, saddle + 0.25, saddle + 0.05, saddle],
                z,
            ),
            lab,
            col,
        )
        cv.disc(cv.proj(x, r + 0.1, z), 0.2 * ppm, lab, (60, 60, 60))
    return saddle


def _pole(cv: Canvas, x: float, z: float, s: int) -> None:
    rng, st = cv.rng, cv.style
    hp = rng.uniform(4.0, 8.5)
    wp = max(rng.uniform(*POLE_WIDTH), POLE_MIN_PX / cv.ppm(z))
    col = cv.color(POLE)
    cv.box(x - wp / 2, x + wp / 2, 0, hp, z, POLE, col)
    u = rng.random()
    if u < st.p_light:
        # an arm over the road with a signal head at its end, or a head on the pole
        if rng.random() < 0.5:
            arm = rng.uniform(2.0, 4.5)
            xa = x - s * arm
            cv.line(cv.proj(x, hp - 0.3, z), cv.proj(xa, hp - 0.3, z), _thick(cv, 0.12, z), POLE, col)
            hx, hy = xa, hp - 0.3
        else:
            hx, hy = x - s * 0.3, hp - 0.2
        hw, hh = LIGHT_HEAD
        box = cv.color(LIGHT)
        cv.box(hx - hw / 2, hx + hw / 2, hy - hh, hy, z - 0.05, LIGHT, box)
        lit = int(rng.integers(3))
        for i, c in enumerate(((230, 30, 20), (240, 170, 0), (30, 220, 80))):
            c = c if i == lit else tuple(int(v * 0.25) for v in c)
            cv.disc(cv.proj(hx, hy - hh * (0.2 + 0.3 * i), z - 0.1), 0.1 * hh * cv.ppm(z), LIGHT, c)
    elif u < st.p_light + st.p_sign:
        ys = rng.uniform(2.2, min(hp, 3.6))
        size = rng.uniform(*SIGN_SIZE)
        col = cv.color(SIGN)
        sx = x - s * size * 0.5
        shape = int(rng.integers(3))
        if shape == 0:
            cv.disc(cv.proj(sx, ys, z - 0.05), size / 2 * cv.ppm(z), SIGN, col)
        elif shape == 1:
            cv.box(sx - size / 2, sx + size / 2, ys - size / 2, ys + size / 2, z - 0.05, SIGN, col)
        else:
            cv.poly(
                cv.proj(
                    [sx - size / 2, sx + size / 2, sx],
                    [ys + size / 2, ys + size / 2, ys - size / 2],
                    z - 0.05,
                ),
                SIGN,
                col,
            )
        inner = (240, 240, 240) if cv.style is SOURCE_STYLE else (200, 200, 196)
        cv.disc(cv.proj(sx, ys, z - 0.06), size * 0.22 * cv.ppm(z), SIGN, inner)
    elif rng.random() < 0.5:  # street lamp
        arm = rng.uniform(1.0, 2.0)
        cv.line(cv.proj(x, hp, z), cv.proj(x - s * arm, hp + 0.2, z), _thick(cv, 0.1, z), POLE, col)


def _tree(cv: Canvas, x: float, z: float) -> None:
    rng = cv.rng
    th = rng.uniform(1.8, 3.5)
    trunk = cv.color(VEG, 0.5)
    trunk = (int(trunk[0] * 1.2 + 20), int(trunk[1] * 0.8), int(trunk[2] * 0.6))
    cv.box(x - 0.15, x + 0.15, 0, th + 0.5, z + 0.1, VEG, trunk)
    r = rng.uniform(1.2, 3.0)
    col = cv.color(VEG)
    for _ in range(4):
        dx, dy = rng.normal(0, r * 0.35, 2)
        cv.disc(
            cv.proj(x + dx, th + r * 0.8 + dy, z),
            r * rng.uniform(0.6, 0.9) * cv.ppm(z),
            VEG,
            tuple(int(c * rng.uniform(0.85, 1.1)) for c in col),
        )


def _static(cv: Canvas, x: float, z: float) -> None:
    """Void street furniture (Cityscapes 'static': bins, boxes, planters)."""
    rng = cv.rng
    w, hgt = rng.uniform(0.4, 1.2), rng.uniform(0.6, 1.3)
    cv.box(x - w / 2, x + w / 2, 0, hgt, z, STATIC, cv.color(STATIC))


def place_objects(cv: Canvas, scene: dict) -> list[tuple[float, Callable[[], None]]]:
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
