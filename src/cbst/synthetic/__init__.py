"""An embedded synthetic benchmark: a small, fair miniature of GTA5 -> Cityscapes.

``make_synthetic(out)`` renders two domains of procedurally drawn street scenes with the 19
Cityscapes classes, in the on-disk layouts of the real data sets (docs/method.md §9.1):

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

Modules, one concept each: ``classes`` (labelIds), ``style`` (the two domains), ``canvas``
(drawing through the camera), ``street`` and ``objects`` (scene content), ``render`` (one image),
``writer`` (the data set on disk).
"""

from cbst.synthetic.render import SYNTHETIC_VERSION, render_image
from cbst.synthetic.writer import SyntheticExistsError, class_frequencies, frequency_table, make_synthetic

__all__ = [
    "SYNTHETIC_VERSION",
    "SyntheticExistsError",
    "class_frequencies",
    "frequency_table",
    "make_synthetic",
    "render_image",
]
