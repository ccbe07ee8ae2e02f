"""The static street: sky, ground, road markings, facades along both sides and the ego hood.

Drawn first (back to front); objects are drawn over it by ``cbst.synthetic.objects``.
"""

from __future__ import annotations

import numpy as np

from cbst.synthetic.canvas import Canvas
from cbst.synthetic.classes import BUILDING, EGO, FENCE, ROAD, SIDEWALK, SKY, TERRAIN, VEG, WALL, Color


def draw_background(cv: Canvas, scene: dict) -> None:
    """Sky, ground, road with markings, sidewalks, and the row of buildings or trees at the far end."""
    rng, h = cv.rng, cv.h
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


def _draw_windows(cv: Canvas, xf: float, z0: float, z1: float, hb: float, color: Color) -> None:
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


def draw_facades(cv: Canvas, scene: dict) -> None:
    """Both sides of the street, far to near: buildings, walls and fences with what stands behind, hedges."""
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


def _veg_mass(cv: Canvas, xf: float, z0: float, z1: float, height: float, shade: float) -> None:
    """A hedge / row of tree crowns in the plane X = xf with a bumpy top."""
    n = max(3, int((z1 - z0) / 1.5))
    zs = np.linspace(z0, z1, n)
    tops = height * (1 + 0.25 * np.sin(np.arange(n) * 1.7 + cv.rng.uniform(0, 6))) + cv.rng.uniform(
        -0.5, 0.5, n
    )
    pts = np.concatenate([cv.proj(xf, 0, zs[::-1]), cv.proj(xf, tops, zs)])
    cv.poly(pts, VEG, cv.color(VEG, shade))


def draw_ego(cv: Canvas) -> None:
    """The ego vehicle's bonnet across the bottom of the frame (void), with a sky reflection."""
    rng = cv.rng
    hood = cv.h * rng.uniform(0.07, 0.13)
    xs = np.linspace(-0.05, 1.05, 24) * cv.w
    ys = cv.h - hood + (hood * 0.5) * ((xs - cv.w / 2) / (cv.w / 2)) ** 2
    pts = np.concatenate([np.stack([xs, ys], 1), [[cv.w * 1.05, cv.h + 2], [-cv.w * 0.05, cv.h + 2]]])
    col = cv.color(EGO)
    cv.poly(pts, EGO, col)
    # a reflection of the sky on the bonnet
    refl = tuple(int(c * 0.5 + 60) for c in col)
    cv.paint(
        np.stack([xs[6:18], ys[6:18] + 2], 1).tolist() + [[xs[17], ys[17] + 4], [xs[6], ys[6] + 4]], refl
    )
