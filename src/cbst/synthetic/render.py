"""One image: the scene drawn on a canvas, then the domain's image formation (texture, lens, sensor)."""

from __future__ import annotations

import cv2
import numpy as np

from cbst.synthetic.canvas import Canvas
from cbst.synthetic.classes import OUT_OF_ROI, SIDEWALK
from cbst.synthetic.objects import place_objects
from cbst.synthetic.street import draw_background, draw_ego, draw_facades
from cbst.synthetic.style import SOURCE_STYLE, TARGET_STYLE, TEX_FINE_LUT, TEX_LOW_LUT

SYNTHETIC_VERSION = "1.2"
"""Version of the renderer. Same version + seed + parameters => byte-identical files."""

DOMAIN_SOURCE, DOMAIN_TARGET_TRAIN, DOMAIN_TARGET_VAL = 0, 1, 2


def _finish(cv: Canvas) -> np.ndarray:
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
    img += TEX_FINE_LUT[lab][:, :, None] * fine + TEX_LOW_LUT[lab][:, :, None] * low
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


def render_image(
    seed: int, domain: int, index: int, size: tuple[int, int] = (256, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: (RGB H x W x 3 uint8, labelIds H x W uint8). ``domain`` 0 = source."""
    rng = np.random.default_rng([seed, domain, index])
    style = SOURCE_STYLE if domain == DOMAIN_SOURCE else TARGET_STYLE
    width, height = size
    cv = Canvas(width, height, style, rng)
    rw, sw = rng.uniform(*style.road_half), rng.uniform(*style.sidewalk)
    scene = {
        "road_half": rw,
        "sidewalk": sw,
        "zend": rng.uniform(45.0, 160.0),
        "sidewalk_color": cv.color(SIDEWALK),
        "facade": {s: rw + sw + rng.uniform(*style.setback) for s in (-1, 1)},
    }
    draw_background(cv, scene)
    draw_facades(cv, scene)
    objs = place_objects(cv, scene)
    for _, draw in sorted(objs, key=lambda o: -o[0]):
        draw()
    if rng.random() < style.p_ego:
        draw_ego(cv)
    image = _finish(cv)
    label = cv.label
    if style.roi_border:
        b = style.roi_border
        label[:, :b] = OUT_OF_ROI
        label[:, -b:] = OUT_OF_ROI
        label[-b:, :] = OUT_OF_ROI
    return image, label
