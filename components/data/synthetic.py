"""The built-in procedural street-scene generator: a game-like source and a real-like target domain.

Scenes are built in a small world model (metres on a flat ground plane, a pinhole camera at
`CAMERA_HEIGHT_M`) and projected, so object size follows distance and the horizon the same way
it does in a dash-cam. Each image is rendered at twice its output size, then downsampled.

The two domains differ the way GTA5 and Cityscapes do:
- appearance: class colours shift *per class* (not one global colour transform, so per-image
  colour normalisation cannot undo it), textures, anti-aliasing, sensor noise, blur, JPEG,
  vignetting and an ego-vehicle hood (ignore, 255) in the target;
- layout: horizon height, focal length (object scale), road width and class frequencies.
Inside the target, a `condition` per image (clear ... night) grades how hard it is to segment.

Every image draws from its own seeded generator, so output does not depend on worker count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from segshift.components.data.labels import IGNORE_INDEX

# Ordered from easiest to hardest; the manifest records one per target image.
CONDITIONS: tuple[str, ...] = ("clear", "overcast", "dusk", "rain", "fog", "night")
HARD_CONDITIONS: tuple[str, ...] = ("rain", "fog", "night")

CAMERA_HEIGHT_M = 1.5
SKY_DEPTH_M = 1000.0
_SUBPIXEL_BITS = 2
_SUBPIXEL = 1 << _SUBPIXEL_BITS

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class DomainStyle:
    """Everything that distinguishes one domain's look and layout."""

    name: str
    palette: dict[int, RGB]            # base albedo per class
    car_colours: tuple[RGB, ...]
    building_colours: tuple[RGB, ...]
    colour_jitter: float               # per-object RGB standard deviation
    texture_fine: dict[int, float]     # per-class amplitude of pixel-scale texture
    texture_coarse: dict[int, float]   # per-class amplitude of blotchy texture
    horizon: tuple[float, float]       # mean, std of horizon row / height
    focal: tuple[float, float]         # focal length / width, range
    road_width_m: tuple[float, float]
    sidewalk_width_m: tuple[float, float]
    # Poisson means of objects per image (layout statistics).
    counts: dict[str, float]
    antialias: bool
    noise_sigma: tuple[float, float]   # sensor noise, in 0..255 units
    blur_sigma: tuple[float, float]    # optics blur, output pixels
    jpeg_quality: tuple[int, int] | None
    vignetting: float
    ego_hood: bool
    # The source's own weather mix (GTA5 has dusk, night and overcast frames too); the target's
    # mix comes from params so that its difficulty spread can be varied.
    conditions: dict[str, float] = field(default_factory=lambda: {"clear": 1.0})


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


SOURCE_PALETTE: dict[int, RGB] = {
    ROAD: (112, 96, 124), SIDEWALK: (214, 150, 196), BUILDING: (176, 120, 88),
    WALL: (206, 204, 116), FENCE: (170, 140, 70), POLE: (236, 236, 236), LIGHT: (44, 44, 40),
    SIGN: (246, 222, 0), VEGETATION: (56, 204, 60), TERRAIN: (186, 224, 96), SKY: (86, 160, 255),
    PERSON: (226, 40, 64), RIDER: (255, 124, 0), CAR: (30, 90, 220), TRUCK: (34, 62, 170),
    BUS: (246, 204, 40), TRAIN: (40, 168, 166), MOTORCYCLE: (126, 20, 146), BICYCLE: (150, 84, 36),
}
# Real-like colours: each class moves in its own direction (desaturated, closer to its neighbours).
REAL_PALETTE: dict[int, RGB] = {
    ROAD: (124, 124, 128), SIDEWALK: (168, 162, 156), BUILDING: (146, 140, 134),
    WALL: (160, 150, 138), FENCE: (112, 112, 102), POLE: (92, 92, 96), LIGHT: (30, 30, 32),
    SIGN: (214, 214, 222), VEGETATION: (82, 112, 50), TERRAIN: (126, 132, 76), SKY: (200, 212, 228),
    PERSON: (64, 62, 74), RIDER: (76, 64, 62), CAR: (70, 72, 78), TRUCK: (206, 206, 206),
    BUS: (188, 62, 52), TRAIN: (204, 204, 184), MOTORCYCLE: (52, 52, 56), BICYCLE: (62, 62, 64),
}
SOURCE_CARS: tuple[RGB, ...] = ((30, 90, 220), (220, 30, 30), (240, 240, 40), (40, 200, 60),
                                (250, 250, 250), (160, 40, 200), (250, 130, 0))
REAL_CARS: tuple[RGB, ...] = ((40, 40, 44), (200, 200, 204), (150, 152, 156), (96, 98, 104),
                              (110, 28, 30), (34, 44, 80), (226, 226, 224))
SOURCE_BUILDINGS: tuple[RGB, ...] = ((176, 120, 88), (200, 170, 120), (150, 90, 70), (120, 130, 170))
REAL_BUILDINGS: tuple[RGB, ...] = ((146, 140, 134), (120, 116, 112), (170, 160, 144), (98, 96, 98))


def source_style() -> DomainStyle:
    return DomainStyle(
        name="source", palette=SOURCE_PALETTE, car_colours=SOURCE_CARS,
        # Games vary object colours and textures a lot; with less variety a source-only model
        # learns exact colours and the gap becomes unrealistically wide (calibrated, see README).
        building_colours=SOURCE_BUILDINGS, colour_jitter=28.0,
        texture_fine={ROAD: 0.04, SIDEWALK: 0.03, BUILDING: 0.03, VEGETATION: 0.08, TERRAIN: 0.06},
        texture_coarse={ROAD: 0.05, SIDEWALK: 0.04, BUILDING: 0.06, VEGETATION: 0.08, SKY: 0.03},
        horizon=(0.40, 0.05), focal=(0.75, 0.95), road_width_m=(8.0, 12.0),
        sidewalk_width_m=(2.5, 4.5),
        counts={"car": 5.0, "parked": 2.0, "truck": 0.9, "bus": 0.5, "train": 0.12,
                "motorcycle": 0.7, "bicycle": 0.4, "person": 2.5, "pole": 5.0, "tree": 3.0,
                "wall": 0.7, "fence": 0.8, "prop": 0.6},
        antialias=False, noise_sigma=(0.0, 0.0), blur_sigma=(0.0, 0.0), jpeg_quality=None,
        vignetting=0.0, ego_hood=False,
        conditions={"clear": 0.55, "overcast": 0.2, "dusk": 0.15, "night": 0.1})


def target_style(appearance_gap: float = 1.0) -> DomainStyle:
    """Real-like style; `appearance_gap` in [0, 1] interpolates class colours from the source's."""
    palette = {c: _mix(SOURCE_PALETTE[c], REAL_PALETTE[c], appearance_gap) for c in SOURCE_PALETTE}
    cars = tuple(_mix(s, r, appearance_gap) for s, r in zip(SOURCE_CARS, REAL_CARS))
    buildings = tuple(_mix(s, r, appearance_gap) for s, r in zip(SOURCE_BUILDINGS, REAL_BUILDINGS))
    return DomainStyle(
        name="target", palette=palette, car_colours=cars, building_colours=buildings,
        colour_jitter=14.0,
        texture_fine={ROAD: 0.07, SIDEWALK: 0.05, BUILDING: 0.05, VEGETATION: 0.28,
                      TERRAIN: 0.18, WALL: 0.06, CAR: 0.02},
        texture_coarse={ROAD: 0.08, SIDEWALK: 0.06, BUILDING: 0.10, VEGETATION: 0.22,
                        TERRAIN: 0.16, SKY: 0.06, WALL: 0.08},
        horizon=(0.47, 0.04), focal=(0.95, 1.2), road_width_m=(6.5, 10.0),
        sidewalk_width_m=(2.0, 3.5),
        counts={"car": 3.5, "parked": 3.0, "truck": 0.4, "bus": 0.3, "train": 0.12,
                "motorcycle": 0.35, "bicycle": 1.0, "person": 4.5, "pole": 7.0, "tree": 5.0,
                "wall": 0.5, "fence": 0.6, "prop": 0.8},
        antialias=True, noise_sigma=(2.0, 5.0), blur_sigma=(0.3, 0.8), jpeg_quality=(55, 90),
        vignetting=0.25, ego_hood=True)


@dataclass
class _Light:
    x: float
    y: float
    radius: float
    colour: RGB


@dataclass
class Canvas:
    """Label, albedo and metric depth, painted together so they always agree."""

    height: int
    width: int
    label: np.ndarray = field(init=False)
    albedo: np.ndarray = field(init=False)
    depth: np.ndarray = field(init=False)
    lights: list[_Light] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.label = np.full((self.height, self.width), IGNORE_INDEX, np.uint8)
        self.albedo = np.zeros((self.height, self.width, 3), np.float32)
        self.depth = np.full((self.height, self.width), SKY_DEPTH_M, np.float32)

    def polygon(self, points: np.ndarray, cls: int, colour: RGB, depth: float) -> None:
        pts = [np.round(np.asarray(points, np.float64) * _SUBPIXEL).astype(np.int32)]
        cv2.fillPoly(self.label, pts, int(cls), cv2.LINE_8, _SUBPIXEL_BITS)
        cv2.fillPoly(self.albedo, pts, tuple(float(c) for c in colour), cv2.LINE_8, _SUBPIXEL_BITS)
        cv2.fillPoly(self.depth, pts, float(depth), cv2.LINE_8, _SUBPIXEL_BITS)

    def box(self, x0: float, y0: float, x1: float, y1: float, cls: int, colour: RGB,
            depth: float) -> None:
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        # Thin structures must stay at least one pixel wide to exist in the label map.
        if x1 - x0 < 1.0:
            x0, x1 = (x0 + x1) / 2 - 0.5, (x0 + x1) / 2 + 0.5
        if y1 - y0 < 1.0:
            y0, y1 = (y0 + y1) / 2 - 0.5, (y0 + y1) / 2 + 0.5
        self.polygon(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), cls, colour, depth)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, cls: int, colour: RGB,
                depth: float, thickness: int = -1) -> None:
        centre = (int(round(cx * _SUBPIXEL)), int(round(cy * _SUBPIXEL)))
        axes = (max(1, int(round(rx * _SUBPIXEL))), max(1, int(round(ry * _SUBPIXEL))))
        args = (centre, axes, 0, 0, 360)
        cv2.ellipse(self.label, *args, int(cls), thickness, cv2.LINE_8, _SUBPIXEL_BITS)
        cv2.ellipse(self.albedo, *args, tuple(float(c) for c in colour), thickness, cv2.LINE_8,
                    _SUBPIXEL_BITS)
        cv2.ellipse(self.depth, *args, float(depth), thickness, cv2.LINE_8, _SUBPIXEL_BITS)

    def segment(self, p0: tuple[float, float], p1: tuple[float, float], width: float, cls: int,
                colour: RGB, depth: float) -> None:
        (x0, y0), (x1, y1) = p0, p1
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        nx, ny = -(y1 - y0) / length * max(width, 1.0) / 2, (x1 - x0) / length * max(width, 1.0) / 2
        quad = np.array([[x0 + nx, y0 + ny], [x1 + nx, y1 + ny], [x1 - nx, y1 - ny], [x0 - nx, y0 - ny]])
        self.polygon(quad, cls, colour, depth)


@dataclass(frozen=True)
class Camera:
    """Pinhole camera over a flat ground plane; x right, y down (pixels), Z forward (metres)."""

    focal: float
    horizon: float
    centre_x: float
    height: int

    def row(self, z: float) -> float:
        return self.horizon + self.focal * CAMERA_HEIGHT_M / z

    def column(self, x: float, z: float) -> float:
        return self.centre_x + self.focal * x / z

    def pixels(self, metres: float, z: float) -> float:
        return self.focal * metres / z

    def point(self, x: float, up: float, z: float) -> tuple[float, float]:
        """Image position of the world point `up` metres above the ground at lateral x, depth z."""
        return self.column(x, z), self.row(z) - self.pixels(up, z)

    def nearest_visible_z(self) -> float:
        return self.focal * CAMERA_HEIGHT_M / max(self.height - self.horizon, 1.0)


class _Painter:
    """Paints one scene: the background planes first, then standing objects far to near."""

    def __init__(self, canvas: Canvas, camera: Camera, style: DomainStyle, rng: np.random.Generator):
        self.c, self.cam, self.style, self.rng = canvas, camera, style, rng
        self.z_near = max(camera.nearest_visible_z(), 2.0)

    def colour(self, cls: int, base: RGB | None = None, scale: float = 1.0) -> RGB:
        base = self.style.palette[cls] if base is None else base
        jitter = self.rng.normal(0.0, self.style.colour_jitter, 3)
        return tuple(float(np.clip(b * scale + j, 0, 255)) for b, j in zip(base, jitter))  # type: ignore

    def count(self, key: str) -> int:
        return int(self.rng.poisson(self.style.counts[key]))

    def ground_quad(self, x0: float, x1: float, cls: int, colour: RGB, z_far: float = 400.0) -> None:
        """A strip of ground between lateral positions x0 and x1, from the image bottom to z_far."""
        z0 = self.z_near * 0.7
        cam = self.cam
        quad = [(cam.column(x0, z0), cam.row(z0)), (cam.column(x1, z0), cam.row(z0)),
                (cam.column(x1, z_far), cam.row(z_far)), (cam.column(x0, z_far), cam.row(z_far))]
        self.c.polygon(np.array(quad), cls, colour, z_far / 4)

    def vertical_plane(self, x: float, z0: float, z1: float, bottom: float, top: float, cls: int,
                       colour: RGB) -> np.ndarray:
        cam = self.cam
        quad = np.array([cam.point(x, bottom, z0), cam.point(x, bottom, z1),
                         cam.point(x, top, z1), cam.point(x, top, z0)])
        self.c.polygon(quad, cls, colour, (z0 + z1) / 2)
        return quad

    # -- background ------------------------------------------------------------------------
    def sky(self) -> None:
        top = np.array(self.style.palette[SKY], np.float32) * 0.8
        bottom = np.minimum(np.array(self.style.palette[SKY], np.float32) * 1.15, 255)
        rows = int(math.ceil(self.cam.horizon)) + 2
        ramp = np.linspace(0, 1, rows, dtype=np.float32)[:, None]
        self.c.albedo[:rows] = (top * (1 - ramp) + bottom * ramp)[:, None, :]
        self.c.label[:rows] = SKY

    def ground(self, road_w: float, side_w: float) -> None:
        far_terrain = self.colour(TERRAIN)
        self.ground_quad(-200, 200, TERRAIN, far_terrain)
        for sign in (-1, 1):
            self.ground_quad(sign * road_w / 2, sign * (road_w / 2 + side_w), SIDEWALK,
                             self.colour(SIDEWALK))
        self.ground_quad(-road_w / 2, road_w / 2, ROAD, self.colour(ROAD))
        self.lane_markings(road_w)

    def lane_markings(self, road_w: float) -> None:
        # Markings are part of the road class, as in Cityscapes.
        paint = _mix(self.style.palette[ROAD], (235, 235, 235), 0.8)
        lanes = int(max(1, road_w // 3.5))
        for k in range(1, lanes):
            x = -road_w / 2 + k * road_w / lanes
            z = self.z_near * 0.7 + self.rng.uniform(0, 3)
            while z < 120:
                quad = [self.cam.point(x - 0.08, 0, z), self.cam.point(x + 0.08, 0, z),
                        self.cam.point(x + 0.08, 0, z + 3), self.cam.point(x - 0.08, 0, z + 3)]
                self.c.polygon(np.array(quad), ROAD, paint, z)
                z += 9.0

    def buildings(self, x_edge: float) -> None:
        for sign in (-1, 1):
            z = self.rng.uniform(3, 10)
            while z < 160:
                depth = self.rng.uniform(8, 30)
                if self.rng.random() < 0.8:
                    x = sign * (x_edge + self.rng.uniform(0.5, 6))
                    height = self.rng.uniform(6, 28)
                    base = self.building_colour()
                    quad = self.vertical_plane(x, z, z + depth, 0, height, BUILDING, base)
                    self.windows(x, z, z + depth, height, base)
                    del quad
                z += depth + self.rng.uniform(0, 6)

    def building_colour(self) -> RGB:
        colours = self.style.building_colours
        return self.colour(BUILDING, colours[int(self.rng.integers(len(colours)))])

    def windows(self, x: float, z0: float, z1: float, height: float, base: RGB) -> None:
        glass = tuple(float(v) * 0.45 for v in base)
        floors = int(height // 3.2)
        step_z = 2.6
        z = z0 + 1.0
        while z + 1.2 < z1:
            for floor in range(1, floors):
                self.vertical_plane(x, z, z + 1.2, floor * 3.2 - 1.4, floor * 3.2 - 0.2, BUILDING,
                                    glass)  # type: ignore[arg-type]
            z += step_z

    def tree(self, x: float, z: float) -> None:
        height = self.rng.uniform(4, 9)
        trunk = self.colour(VEGETATION, scale=0.55)
        cx, ground = self.cam.column(x, z), self.cam.row(z)
        w = self.cam.pixels(0.35, z)
        self.c.box(cx - w / 2, ground, cx + w / 2, ground - self.cam.pixels(height * 0.6, z),
                   VEGETATION, trunk, z)
        r = self.cam.pixels(self.rng.uniform(1.5, 3.0), z)
        cy = ground - self.cam.pixels(height * 0.75, z)
        self.c.ellipse(cx, cy, r, r * self.rng.uniform(0.8, 1.3), VEGETATION, self.colour(VEGETATION), z)

    def barrier(self, x: float, z0: float, length: float, cls: int) -> None:
        z1 = z0 + length
        if cls == WALL:
            self.vertical_plane(x, z0, z1, 0, self.rng.uniform(0.8, 2.2), WALL, self.colour(WALL))
            return
        colour = self.colour(FENCE)
        top = self.rng.uniform(1.0, 1.8)
        for up in (0.25, top * 0.6, top):   # rails
            self.c.segment(self.cam.point(x, up, z0), self.cam.point(x, up, z1),
                           self.cam.pixels(0.08, z0), FENCE, colour, z0)
        z = z0
        while z <= z1:                       # posts: see-through lattice
            self.c.segment(self.cam.point(x, 0, z), self.cam.point(x, top, z),
                           self.cam.pixels(0.08, z), FENCE, colour, z)
            z += 1.2

    # -- standing objects --------------------------------------------------------------------
    def pole(self, x: float, z: float) -> None:
        height = self.rng.uniform(3.5, 7.0)
        cx, ground = self.cam.column(x, z), self.cam.row(z)
        w = self.cam.pixels(0.18, z)
        top = ground - self.cam.pixels(height, z)
        self.c.box(cx - w / 2, ground, cx + w / 2, top, POLE, self.colour(POLE), z)
        kind = self.rng.random()
        if kind < 0.35:
            self.traffic_sign(cx, ground - self.cam.pixels(self.rng.uniform(2.2, 3.0), z), z)
        elif kind < 0.6:
            self.traffic_light(cx, top, z)
        elif kind < 0.75:
            lamp_y = top
            self.c.lights.append(_Light(cx, lamp_y, self.cam.pixels(0.6, z), (255, 220, 160)))

    def traffic_sign(self, cx: float, cy: float, z: float) -> None:
        r = self.cam.pixels(self.rng.uniform(0.3, 0.45), z)
        colour = self.colour(SIGN)
        shape = self.rng.integers(3)
        if shape == 0:
            self.c.ellipse(cx, cy, r, r, SIGN, colour, z)
        elif shape == 1:
            tri = np.array([[cx - r, cy + r * 0.8], [cx + r, cy + r * 0.8], [cx, cy - r]])
            self.c.polygon(tri, SIGN, colour, z)
        else:
            self.c.box(cx - r * 1.3, cy - r * 0.7, cx + r * 1.3, cy + r * 0.7, SIGN, colour, z)

    def traffic_light(self, cx: float, top: float, z: float) -> None:
        w, h = self.cam.pixels(0.35, z), self.cam.pixels(1.0, z)
        self.c.box(cx - w / 2, top, cx + w / 2, top + h, LIGHT, self.colour(LIGHT), z)
        lit = int(self.rng.integers(3))
        lamp_colours = ((255, 40, 30), (255, 190, 0), (40, 255, 90))
        for k in range(3):
            colour = lamp_colours[k] if k == lit else (60, 60, 60)
            self.c.ellipse(cx, top + h * (k + 0.5) / 3, w * 0.32, w * 0.32, LIGHT, colour, z)
        self.c.lights.append(_Light(cx, top + h * (lit + 0.5) / 3, w * 1.5, lamp_colours[lit]))

    def person(self, x: float, z: float, cls: int = PERSON, seat: float = 0.0) -> None:
        """A pedestrian (or, with `cls=RIDER` and a seat height, a rider sitting on a two-wheeler)."""
        cam = self.cam
        height = self.rng.uniform(1.55, 1.95)
        cx, ground = cam.column(x, z), cam.row(z) - cam.pixels(seat, z)
        px = cam.pixels(1.0, z)
        clothes, legs = self.colour(cls), self.colour(cls, scale=0.6)
        skin = _mix(self.style.palette[cls], (220, 180, 150), 0.5)
        hip = ground - (0.0 if seat else px * height * 0.48)
        if not seat:
            stride = px * self.rng.uniform(0.05, 0.2)
            self.c.segment((cx - stride, ground), (cx, hip), px * 0.16, cls, legs, z)
            self.c.segment((cx + stride, ground), (cx, hip), px * 0.16, cls, legs, z)
        shoulder = hip - px * height * 0.32
        self.c.box(cx - px * 0.22, hip, cx + px * 0.22, shoulder, cls, clothes, z)
        arm = px * 0.07
        self.c.segment((cx - px * 0.22, shoulder), (cx - px * 0.3, hip), arm * 2, cls, clothes, z)
        self.c.segment((cx + px * 0.22, shoulder), (cx + px * 0.3, hip), arm * 2, cls, clothes, z)
        head = px * 0.12
        self.c.ellipse(cx, shoulder - head * 1.1, head, head * 1.15, cls, skin, z)

    def two_wheeler(self, x: float, z: float, cls: int) -> None:
        """A motorcycle or bicycle seen from the side, crossing or parked, usually with a rider."""
        cam = self.cam
        px = cam.pixels(1.0, z)
        cx, ground = cam.column(x, z), cam.row(z)
        wheel = px * (0.33 if cls == BICYCLE else 0.3)
        base = 0.9 if cls == BICYCLE else 1.0
        colour = self.colour(cls)
        tyre = (30.0, 30.0, 30.0)
        for dx in (-base / 2, base / 2):
            if cls == BICYCLE:
                self.c.ellipse(cx + dx * px, ground - wheel, wheel, wheel, cls, tyre, z,
                               thickness=max(1, int(round(px * 0.05 * _SUBPIXEL))))
            else:
                self.c.ellipse(cx + dx * px, ground - wheel, wheel, wheel, cls, tyre, z)
        hub_y = ground - wheel
        if cls == BICYCLE:
            seat = (cx - px * 0.15, hub_y - px * 0.45)
            for a, b in (((cx - base / 2 * px, hub_y), seat), (seat, (cx + px * 0.1, hub_y)),
                         ((cx + px * 0.1, hub_y), (cx + base / 2 * px, hub_y)),
                         (seat, (cx + px * 0.3, hub_y - px * 0.5))):
                self.c.segment(a, b, px * 0.05, cls, colour, z)
        else:
            body = np.array([[cx - px * 0.55, hub_y], [cx + px * 0.5, hub_y],
                             [cx + px * 0.4, hub_y - px * 0.45], [cx - px * 0.35, hub_y - px * 0.4]])
            self.c.polygon(body, cls, colour, z)
            self.c.lights.append(_Light(cx + px * 0.5, hub_y - px * 0.3, px * 0.25, (255, 240, 200)))
        if self.rng.random() < 0.8:
            self.person(x, z, cls=RIDER, seat=0.75 if cls == BICYCLE else 0.8)

    def vehicle_rear(self, x: float, z: float, cls: int) -> None:
        """A car, truck, bus or tram seen from behind, as on the road ahead."""
        cam = self.cam
        px = cam.pixels(1.0, z)
        width, height = {CAR: (1.8, 1.5), TRUCK: (2.5, 3.4), BUS: (2.55, 3.1), TRAIN: (2.65, 3.6)}[cls]
        width *= self.rng.uniform(0.92, 1.08)
        height *= self.rng.uniform(0.92, 1.1)
        if cls == CAR:
            body = self.colour(CAR, self.style.car_colours[int(self.rng.integers(len(self.style.car_colours)))])
        else:
            body = self.colour(cls)
        cx, ground = cam.column(x, z), cam.row(z)
        w, h = width * px, height * px
        tyre = (28.0, 28.0, 28.0)
        for side in (-1, 1):
            self.c.box(cx + side * w * 0.32 - px * 0.12, ground, cx + side * w * 0.32 + px * 0.12,
                       ground - px * 0.6, cls, tyre, z)
        bottom = ground - px * 0.25
        glass = tuple(v * 0.35 for v in body)
        if cls == CAR:
            self.c.box(cx - w / 2, bottom, cx + w / 2, bottom - h * 0.55, CAR, body, z)
            cabin = np.array([[cx - w * 0.45, bottom - h * 0.55], [cx + w * 0.45, bottom - h * 0.55],
                              [cx + w * 0.32, bottom - h], [cx - w * 0.32, bottom - h]])
            self.c.polygon(cabin, CAR, body, z)
            self.c.polygon(cabin * [1, 1] + [[w * 0.05, -h * 0.05], [-w * 0.05, -h * 0.05],
                                                [-w * 0.03, h * 0.07], [w * 0.03, h * 0.07]],
                           CAR, glass, z)  # type: ignore[arg-type]
        else:
            self.c.box(cx - w / 2, bottom, cx + w / 2, bottom - h, cls, body, z)
            if cls in (BUS, TRAIN):
                self.c.box(cx - w * 0.42, bottom - h * 0.55, cx + w * 0.42, bottom - h * 0.9, cls,
                           glass, z)  # type: ignore[arg-type]
            if cls == TRAIN:   # pantograph
                self.c.segment((cx, bottom - h), (cx + w * 0.2, bottom - h * 1.25), px * 0.08, TRAIN,
                               (40, 40, 40), z)
            if cls == TRUCK:   # cab roof line
                self.c.box(cx - w / 2, bottom - h * 0.98, cx + w / 2, bottom - h, TRUCK,
                           tuple(v * 0.7 for v in body), z)  # type: ignore[arg-type]
        for side in (-1, 1):
            lx = cx + side * w * 0.4
            self.c.box(lx - px * 0.12, bottom - h * 0.28, lx + px * 0.12, bottom - h * 0.38, cls,
                       (230, 30, 30), z)
            self.c.lights.append(_Light(lx, bottom - h * 0.33, px * 0.2, (255, 40, 30)))

    def vehicle_side(self, x: float, z: float, length: float) -> None:
        """A car parked along the kerb, seen from the side in perspective."""
        body = self.colour(CAR, self.style.car_colours[int(self.rng.integers(len(self.style.car_colours)))])
        self.vertical_plane(x, z, z + length, 0.25, 0.95, CAR, body)
        self.vertical_plane(x, z + length * 0.25, z + length * 0.8, 0.95, 1.45, CAR, body)
        glass = tuple(v * 0.35 for v in body)
        self.vertical_plane(x, z + length * 0.3, z + length * 0.75, 1.0, 1.38, CAR, glass)  # type: ignore
        for dz in (0.18, 0.82):
            zz = z + length * dz
            r = self.cam.pixels(0.32, zz)
            cx, cy = self.cam.point(x, 0.32, zz)
            self.c.ellipse(cx, cy, r * 0.45, r, CAR, (26, 26, 26), zz)

    def prop(self, x: float, z: float) -> None:
        """Street furniture outside the 19 classes (bins, ad columns): labelled ignore (255)."""
        cam = self.cam
        cx, ground = cam.column(x, z), cam.row(z)
        w, h = cam.pixels(self.rng.uniform(0.5, 1.2), z), cam.pixels(self.rng.uniform(0.8, 2.6), z)
        colour = tuple(float(v) for v in self.rng.uniform(40, 220, 3))
        self.c.box(cx - w / 2, ground, cx + w / 2, ground - h, IGNORE_INDEX, colour, z)  # type: ignore

    def ego_hood(self) -> None:
        h, w = self.c.height, self.c.width
        top = h * self.rng.uniform(0.86, 0.92)
        curve = np.array([[0, h], [0, top + h * 0.05], [w * 0.25, top + h * 0.01], [w * 0.5, top],
                          [w * 0.75, top + h * 0.01], [w, top + h * 0.05], [w, h]])
        self.c.polygon(curve, IGNORE_INDEX, (38, 38, 44), 1.0)


def _place_objects(p: _Painter, road_w: float, side_w: float) -> list[tuple[float, object]]:
    """Standing objects as (depth, draw) pairs so they can be painted far to near."""
    rng, items = p.rng, []
    zmin = p.z_near + 0.5

    def add(z: float, fn, *args) -> None:
        items.append((z, lambda: fn(*args)))

    kerb = road_w / 2 + side_w
    lanes = [-road_w / 2 + (k + 0.5) * road_w / max(1, int(road_w // 3.3))
             for k in range(max(1, int(road_w // 3.3)))]
    for key, cls in (("car", CAR), ("truck", TRUCK), ("bus", BUS)):
        for _ in range(p.count(key)):
            z = rng.uniform(zmin + 3, 70)
            add(z, p.vehicle_rear, lanes[int(rng.integers(len(lanes)))] + rng.normal(0, 0.3), z, cls)
    for _ in range(p.count("train")):
        z = rng.uniform(zmin + 6, 60)
        add(z, p.vehicle_rear, rng.normal(0, 0.3), z, TRAIN)
    for _ in range(p.count("parked")):
        z = rng.uniform(zmin, 60)
        add(z, p.vehicle_side, rng.choice([-1, 1]) * (road_w / 2 - 1.0), z, rng.uniform(3.8, 4.6))
    for key, cls in (("motorcycle", MOTORCYCLE), ("bicycle", BICYCLE)):
        for _ in range(p.count(key)):
            z = rng.uniform(zmin + 1, 45)
            x = rng.uniform(-road_w / 2, road_w / 2) if rng.random() < 0.6 else \
                rng.choice([-1, 1]) * rng.uniform(road_w / 2, kerb)
            add(z, p.two_wheeler, x, z, cls)
    for _ in range(p.count("person")):
        z = rng.uniform(zmin, 50)
        x = rng.choice([-1, 1]) * rng.uniform(road_w / 2 + 0.3, kerb - 0.3)
        if rng.random() < 0.12:   # crossing the road
            x = rng.uniform(-road_w / 2, road_w / 2)
        add(z, p.person, x, z)
    for _ in range(p.count("pole")):
        z = rng.uniform(zmin + 1, 80)
        add(z, p.pole, rng.choice([-1, 1]) * (kerb - 0.3), z)
    for _ in range(p.count("tree")):
        z = rng.uniform(zmin + 2, 90)
        add(z + 0.5, p.tree, rng.choice([-1, 1]) * (kerb + rng.uniform(0.5, 4)), z)
    for _ in range(p.count("prop")):
        z = rng.uniform(zmin, 40)
        add(z, p.prop, rng.choice([-1, 1]) * rng.uniform(road_w / 2 + 0.5, kerb), z)
    return items


def paint_scene(style: DomainStyle, height: int, width: int, rng: np.random.Generator) -> Canvas:
    """Geometry, labels, albedo and depth of one scene, at the given (render) resolution."""
    canvas = Canvas(height, width)
    horizon = float(np.clip(rng.normal(*style.horizon), 0.25, 0.65)) * height
    camera = Camera(focal=rng.uniform(*style.focal) * width, horizon=horizon,
                    centre_x=width / 2 + rng.normal(0, width * 0.04), height=height)
    painter = _Painter(canvas, camera, style, rng)
    road_w, side_w = rng.uniform(*style.road_width_m), rng.uniform(*style.sidewalk_width_m)
    painter.sky()
    painter.buildings(road_w / 2 + side_w)
    painter.ground(road_w, side_w)
    kerb = road_w / 2 + side_w
    for key, cls in (("wall", WALL), ("fence", FENCE)):
        for _ in range(painter.count(key)):
            painter.barrier(rng.choice([-1, 1]) * (kerb + 0.1), rng.uniform(painter.z_near, 40),
                            rng.uniform(5, 25), cls)
    for _, draw in sorted(_place_objects(painter, road_w, side_w), key=lambda item: -item[0]):
        draw()
    if style.ego_hood:
        painter.ego_hood()
    return canvas


# -- appearance ----------------------------------------------------------------------------

def _noise_field(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    h, w = shape
    small = rng.standard_normal((max(1, h // cell), max(1, w // cell))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _per_class(values: dict[int, float]) -> np.ndarray:
    table = np.zeros(256, np.float32)
    for cls, v in values.items():
        table[cls] = v
    return table


def apply_texture(canvas: Canvas, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    shape = canvas.label.shape
    fine = rng.standard_normal(shape).astype(np.float32)
    coarse = _noise_field(rng, shape, 16)
    modulation = 1.0 + _per_class(style.texture_fine)[canvas.label] * fine \
        + _per_class(style.texture_coarse)[canvas.label] * coarse
    return canvas.albedo * modulation[..., None]


def _haze(img: np.ndarray, depth: np.ndarray, visibility_m: float, colour: RGB) -> np.ndarray:
    transmission = np.exp(-depth / visibility_m)[..., None]
    return img * transmission + np.array(colour, np.float32) * (1.0 - transmission)


def _glows(canvas: Canvas, strength: float) -> np.ndarray:
    glow = np.zeros_like(canvas.albedo)
    for light in canvas.lights:
        cv2.circle(glow, (int(light.x), int(light.y)), max(1, int(light.radius)), light.colour, -1)
    sigma = max(1.0, canvas.width / 160)
    return cv2.GaussianBlur(glow, (0, 0), sigma) * strength


def _desaturate(img: np.ndarray, amount: float) -> np.ndarray:
    grey = img.mean(axis=2, keepdims=True)
    return img * (1 - amount) + grey * amount


def apply_condition(img: np.ndarray, canvas: Canvas, condition: str,
                    rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Weather and light on a float RGB image (0..255); returns it and the extra sensor noise gain."""
    if condition == "clear":
        return _haze(img * rng.uniform(0.95, 1.1), canvas.depth, 400.0, (200, 210, 225)), 1.0
    if condition == "overcast":
        img = _desaturate(img, rng.uniform(0.3, 0.5)) * rng.uniform(0.75, 0.9)
        return _haze(img, canvas.depth, 150.0, (170, 172, 176)), 1.2
    if condition == "dusk":
        tint = np.array([1.0, 0.72, 0.5], np.float32) * rng.uniform(0.45, 0.65)
        img = _haze(img * tint, canvas.depth, 120.0, (150, 90, 70))
        return img + _glows(canvas, 0.5), 1.8
    if condition == "rain":
        img = _desaturate(img, rng.uniform(0.3, 0.5)) * rng.uniform(0.55, 0.75)
        img = _haze(img, canvas.depth, rng.uniform(50, 90), (140, 145, 150))
        streaks = np.zeros(canvas.label.shape, np.float32)
        h, w = streaks.shape
        slant = rng.uniform(-0.3, 0.3)
        for _ in range(int(h * w / 600)):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            length = rng.uniform(0.02, 0.06) * h
            cv2.line(streaks, (int(x), int(y)), (int(x + slant * length), int(y + length)), 1.0, 1)
        img = img + streaks[..., None] * rng.uniform(40, 80)
        return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.8, 1.6)), 1.6
    if condition == "fog":
        # Attenuation 1/visibility of 0.0125..0.03 per metre: Foggy Cityscapes' densest settings.
        # Denser fog turns the whole frame uniform grey, which a network labels confidently wrong.
        img = _haze(_desaturate(img, 0.3), canvas.depth, rng.uniform(33, 80), (182, 186, 192))
        return img, 1.3
    if condition == "night":
        img = img * np.array([0.7, 0.8, 1.0], np.float32) * rng.uniform(0.12, 0.25)
        return img + _glows(canvas, rng.uniform(0.8, 1.4)), 3.0
    raise ValueError(f"unknown condition '{condition}'; expected one of {CONDITIONS}")


def apply_sensor(img: np.ndarray, style: DomainStyle, noise_gain: float,
                 rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if style.vignetting:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
        img = img * (1.0 - style.vignetting * r2 / 2)[..., None]
    sigma = rng.uniform(*style.blur_sigma)
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    noise = rng.uniform(*style.noise_sigma) * noise_gain
    if noise > 0:
        img = img + rng.standard_normal(img.shape).astype(np.float32) * noise
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if style.jpeg_quality is not None:
        quality = int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


def render_sample(style: DomainStyle, height: int, width: int, condition: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 train-id label) pair of size height x width."""
    canvas = paint_scene(style, height * 2, width * 2, rng)
    img = apply_texture(canvas, style, rng)
    img, noise_gain = apply_condition(img, canvas, condition, rng)
    resample = cv2.INTER_AREA if style.antialias else cv2.INTER_NEAREST
    img = cv2.resize(img, (width, height), interpolation=resample)
    label = np.ascontiguousarray(canvas.label[::2, ::2])
    return apply_sensor(img, style, noise_gain, rng), label


def sample_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """An independent generator per image, so output is the same for any worker count."""
    keys = (seed, ("source", "target").index(domain), ("train", "val", "test").index(split), index)
    return np.random.default_rng(np.random.SeedSequence(keys))


def choose_condition(conditions: dict[str, float], rng: np.random.Generator) -> str:
    names = [c for c in CONDITIONS if conditions.get(c, 0) > 0]
    weights = np.array([conditions[c] for c in names], np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]
