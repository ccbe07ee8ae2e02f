"""The Cityscapes labelIds the synthetic scenes are drawn with (docs/method.md §9.2).

Scenes are labelled in raw labelIds, as GTA5 and Cityscapes ship them, so the benchmark's files go
through the same label lookup as the real data sets. Void ids (ego vehicle, out of ROI, static)
are drawn too, as in Cityscapes; a pixel nothing is drawn on keeps 0 (unlabeled).
"""

EGO, OUT_OF_ROI, STATIC = 1, 3, 4
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTO, BICYCLE = 24, 25, 26, 27, 28, 31, 32, 33

Color = tuple[int, int, int]
"""An RGB colour, 0-255 per channel."""
