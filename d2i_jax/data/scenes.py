"""Procedural indoor scenes rendered by vectorised ray casting in NumPy: RGB, normals, depth, semantics, caption.

A scene is a box-shaped room (floor, four walls, ceiling) holding a few yaw-rotated boxes and spheres, lit by one
or two point lights (Lambertian, hard shadows cast by the objects) plus ambient light, seen by a pinhole camera
with a random pose and field of view. Materials are solid (3D) procedural textures: planks, checker, stripes,
value noise. Everything is drawn from one integer seed, so a scene is reproducible anywhere.

Conventions of what `render` returns (and what `write_nyu_layout` writes):
- Normals are in the *camera frame of OpenGL*: x right, y up, z towards the viewer. A visible surface faces the
  camera, n · r < 0 for the viewing ray r; a fronto-parallel wall is (0, 0, 1), the floor seen level has n_y > 0.
  The normal PNG stores round((n + 1) / 2 · 255) per channel, so the Bae / Diff-2-in-1 decoding
  n = RGB / 255 · 2 - 1 gives these vectors back (within 1/255 per component); invalid pixels are (0, 0, 0).
- Depth is the z-distance along the optical axis in metres, 0 where invalid.
- Semantic ids: 0 void (no hit), 1 floor, 2 wall, 3 ceiling, 4 box, 5 sphere.
- Like Kinect data, some pixels have no normal / depth: a band at one image border, a few elliptical holes, and
  surfaces seen at grazing angles. Their semantic id is kept.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from d2i_jax.data import keys
from d2i_jax.data.atomic import write_npy_atomically, write_png_atomically
from d2i_jax.data.files import PathLike, as_path
from d2i_jax.data.nyu import EXTRA_KEYS, NyuNormals
from d2i_jax.distributed import process_zero_writes

VOID, FLOOR, WALL, CEILING, BOX, SPHERE = range(6)
CLASS_NAMES = ("void", "floor", "wall", "ceiling", "box", "sphere")

# Named colours (sRGB in [0, 1]); the names go into captions.
COLOURS = {
    "red": (0.80, 0.15, 0.13), "blue": (0.15, 0.30, 0.80), "green": (0.20, 0.62, 0.25),
    "yellow": (0.90, 0.80, 0.20), "orange": (0.92, 0.50, 0.12), "purple": (0.50, 0.25, 0.65),
    "pink": (0.92, 0.55, 0.70), "white": (0.92, 0.92, 0.90), "black": (0.12, 0.12, 0.12),
    "gray": (0.50, 0.50, 0.52), "teal": (0.10, 0.55, 0.55), "brown": (0.50, 0.32, 0.18),
}
WALL_COLOURS = {
    "white": (0.90, 0.89, 0.86), "beige": (0.85, 0.78, 0.65), "gray": (0.62, 0.63, 0.65),
    "light blue": (0.65, 0.75, 0.85), "light green": (0.70, 0.82, 0.68), "yellow": (0.90, 0.84, 0.55),
}
FLOORS = {  # caption word -> (pattern, colour, second colour, pattern scale in metres)
    "wooden": ("planks", (0.55, 0.36, 0.20), (0.40, 0.25, 0.13), 0.18),
    "tiled": ("checker", (0.85, 0.85, 0.82), (0.35, 0.35, 0.38), 0.5),
    "carpeted": ("noise", (0.45, 0.20, 0.20), (0.30, 0.12, 0.14), 0.08),
    "concrete": ("noise", (0.55, 0.55, 0.53), (0.42, 0.42, 0.42), 0.3),
}
OBJECT_PATTERNS = ("plain", "checker", "stripes", "noise")
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Material:
    """A solid texture: `pattern` mixes `rgb` and `rgb2` with period `scale` (metres) in object coordinates."""

    name: str
    rgb: tuple[float, float, float]
    rgb2: tuple[float, float, float]
    pattern: str = "plain"
    scale: float = 0.25
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Box:
    """A box standing on the floor (or anything), rotated by `yaw` radians about the vertical axis."""

    center: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float
    material: Material


@dataclasses.dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    material: Material


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole camera at `position` in a y-up world, turned by yaw (about y), then pitch (about x, negative looks
    down), then roll (about the optical axis); angles in radians."""

    position: tuple[float, float, float]
    yaw: float
    pitch: float
    roll: float
    hfov: float  # horizontal field of view
    principal: tuple[float, float] = (0.0, 0.0)  # principal-point offset from the centre, fraction of the size

    @property
    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation; its columns are the camera's right, up and backward axes in the world."""
        return _rot_y(self.yaw) @ _rot_x(self.pitch) @ _rot_z(self.roll)

    def intrinsics(self, size: tuple[int, int]) -> np.ndarray:
        """3x3 K (pixels) for an image of `size` = (H, W); square pixels."""
        h, w = size
        f = 0.5 * w / np.tan(0.5 * self.hfov)
        cx, cy = w * (0.5 + self.principal[0]), h * (0.5 + self.principal[1])
        return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]], np.float32)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything needed to render: room bounds (x, y, z lower / upper), contents, lights, camera, sensor holes."""

    room_lo: tuple[float, float, float]
    room_hi: tuple[float, float, float]
    floor: Material
    wall: Material
    ceiling: Material
    boxes: tuple[Box, ...]
    spheres: tuple[Sphere, ...]
    lights: tuple[tuple[tuple[float, float, float], float], ...]  # (position, intensity)
    ambient: float
    camera: Camera
    border_band: tuple[str, float]  # ("left" | "right" | "none", width as a fraction of W)
    holes: tuple[tuple[float, float, float, float], ...]  # ellipses (cx, cy, rx, ry), fractions of (W, H)
    noise_seed: int


@dataclasses.dataclass(frozen=True)
class Rendering:
    """One rendered view. `normal` is zero and `depth` 0 where `mask` is False."""

    image: np.ndarray  # uint8 [H, W, 3]
    normal: np.ndarray  # float32 [H, W, 3], camera frame (x right, y up, z towards the viewer)
    mask: np.ndarray  # bool [H, W]
    depth: np.ndarray  # float32 [H, W], metres
    semseg: np.ndarray  # uint8 [H, W], ids of CLASS_NAMES
    intrinsics: np.ndarray  # float32 [3, 3]
    caption: str


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------------------------


def _vec(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Geometry is float32 throughout: half the memory traffic of float64, ample precision for rooms in metres."""
    return np.asarray(x, np.float32)


def _mul(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Rows of `x` (Nx3) mapped by the 3x3 `m`: (m @ x.T).T, without BLAS threads (slow for Nx3 on busy hosts)."""
    return np.einsum("ij,kj->ik", x, m.astype(x.dtype))


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _object_material(rng: np.random.Generator) -> Material:
    name = str(rng.choice(list(COLOURS)))
    rgb = np.array(COLOURS[name])
    rgb2 = np.clip(rgb * rng.uniform(0.45, 0.75) + rng.uniform(0, 0.1), 0, 1)
    return Material(name, tuple(rgb), tuple(rgb2), str(rng.choice(OBJECT_PATTERNS)), float(rng.uniform(0.08, 0.3)),
                    int(rng.integers(2**31)))


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw a room, 1-4 objects placed in view, one or two lights, a camera pose and Kinect-like holes."""
    half_w, height, depth = rng.uniform(1.8, 3.0), rng.uniform(2.5, 3.0), rng.uniform(4.5, 7.0)
    lo, hi = (-half_w, 0.0, -depth), (half_w, height, 1.0)

    yaw, pitch, roll = rng.uniform(-0.35, 0.35), rng.uniform(-0.35, -0.08), rng.uniform(-0.05, 0.05)
    cam_pos = (rng.uniform(-0.4, 0.4) * half_w, rng.uniform(1.2, 1.7), rng.uniform(0.0, 0.5))
    hfov = np.deg2rad(rng.uniform(55, 70))
    camera = Camera(cam_pos, float(yaw), float(pitch), float(roll), float(hfov),
                    (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02))))

    floor_name = str(rng.choice(list(FLOORS)))
    pattern, c1, c2, scale = FLOORS[floor_name]
    floor = Material(floor_name, c1, c2, pattern, scale, int(rng.integers(2**31)))
    wall_name = str(rng.choice(list(WALL_COLOURS)))
    wc = np.array(WALL_COLOURS[wall_name])
    wall = Material(wall_name, tuple(wc), tuple(wc * 0.9), str(rng.choice(["plain", "noise", "stripes"])),
                    float(rng.uniform(0.3, 0.8)), int(rng.integers(2**31)))
    ceiling = Material("white", (0.93, 0.93, 0.92), (0.85, 0.85, 0.85), "plain")

    # Objects on the floor, in front of the camera, not overlapping (xz bounding circles).
    placed: list[tuple[float, float, float]] = []
    boxes: list[Box] = []
    spheres: list[Sphere] = []
    for _ in range(int(rng.integers(1, 5))):
        is_box = rng.random() < 0.6
        half = rng.uniform(0.15, 0.5, size=3) if is_box else None
        radius = float(np.hypot(half[0], half[2])) if is_box else float(rng.uniform(0.15, 0.4))
        if not is_box and boxes and rng.random() < 0.3:  # a ball resting on a box
            b = boxes[int(rng.integers(len(boxes)))]
            r = min(radius, min(b.half[0], b.half[2]))
            spheres.append(Sphere((b.center[0], 2 * b.half[1] + r, b.center[2]), r, _object_material(rng)))
            continue
        for _try in range(20):
            angle = yaw + rng.uniform(-0.35, 0.35) * hfov
            dist = rng.uniform(2.0, depth + cam_pos[2] - 0.6)
            x, z = cam_pos[0] - np.sin(angle) * dist, cam_pos[2] - np.cos(angle) * dist
            inside = abs(x) < half_w - radius - 0.05 and lo[2] + radius + 0.05 < z
            if inside and all(np.hypot(x - px, z - pz) > radius + pr + 0.05 for px, pz, pr in placed):
                break
        else:
            continue
        placed.append((x, z, radius))
        if is_box:
            boxes.append(Box((x, half[1], z), tuple(half), float(rng.uniform(0, np.pi)), _object_material(rng)))
        else:
            spheres.append(Sphere((x, radius, z), radius, _object_material(rng)))

    lights = tuple(
        ((float(rng.uniform(-0.6, 0.6) * half_w), height - 0.25, float(rng.uniform(-depth + 1.0, 0.0))),
         float(rng.uniform(0.9, 1.4)))
        for _ in range(int(rng.integers(1, 3)))
    )
    band = (str(rng.choice(["left", "right", "none"], p=[0.5, 0.2, 0.3])), float(rng.uniform(0.015, 0.04)))
    holes = tuple(tuple(float(v) for v in (*rng.uniform(0.1, 0.9, 2), *rng.uniform(0.01, 0.05, 2)))
                  for _ in range(int(rng.integers(1, 4))))
    return Scene(lo, hi, floor, wall, ceiling, tuple(boxes), tuple(spheres), lights,
                 float(rng.uniform(0.2, 0.35)), camera, band, holes, int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------------------------
# Ray casting (rays are Nx3; directions have camera-z = -1, so the ray parameter t *is* the depth)
# ---------------------------------------------------------------------------------------------------------------


def _hit_room(o: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Exit point of rays starting inside the room: t, inward normal, semantic id, hit point (world)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(d > 0, (hi - o) / d, np.where(d < 0, (lo - o) / d, np.inf))
    axis = np.argmin(t_axes, axis=1)
    rows = np.arange(len(d))
    t = t_axes[rows, axis]
    n = np.zeros_like(d)
    n[rows, axis] = -np.sign(d[rows, axis])
    sem = np.where(axis == 1, np.where(n[:, 1] > 0, FLOOR, CEILING), WALL)
    p = o + t[:, None] * d
    p[rows, axis] = np.where(d[rows, axis] > 0, hi[axis], lo[axis])  # exactly on the plane: stable textures
    return t, n, sem, p


def _bounding_hits(o: np.ndarray, d: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the rays whose line passes within `radius` of `center` in front of the origin (a cheap cull)."""
    oc = o - center
    b = np.einsum("ij,ij->i", oc, d)
    c = np.einsum("ij,ij->i", oc, oc) - radius**2
    a = np.einsum("ij,ij->i", d, d)
    return np.flatnonzero((b * b - a * c >= 0) & ((b < 0) | (c < 0)))


def _hit_box(o: np.ndarray, d: np.ndarray, box: Box) -> tuple[np.ndarray, ...]:
    """Slab test in the box frame, on the rays that pass its bounding sphere.

    Returns (ray indices, t, outward world normal, hit point in box coordinates) of the rays that hit.
    """
    half, center = _vec(box.half), _vec(box.center)
    idx = _bounding_hits(o, d, center, float(np.linalg.norm(half)))
    rot = _rot_y(box.yaw)
    ol, dl = _mul(o[idx] - center, rot.T), _mul(d[idx], rot.T)  # world -> box frame
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - ol) / dl, (half - ol) / dl
    t1, t2 = np.nan_to_num(t1, nan=-np.inf), np.nan_to_num(t2, nan=np.inf)
    t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = np.argmax(t_min, axis=1)
    rows = np.arange(len(idx))
    t_near, t_far = t_min[rows, axis], t_max.min(axis=1)
    hit = (t_near <= t_far) & (t_near > _EPS)
    idx, t, axis, ol, dl, rows = idx[hit], t_near[hit], axis[hit], ol[hit], dl[hit], rows[: hit.sum()]
    n_local = np.zeros_like(dl)
    n_local[rows, axis] = -np.sign(dl[rows, axis])
    p = ol + t[:, None] * dl
    p[rows, axis] = n_local[rows, axis] * half[axis]  # exactly on the face
    return idx, t, _mul(n_local, rot), p


def _hit_sphere(o: np.ndarray, d: np.ndarray, s: Sphere) -> tuple[np.ndarray, ...]:
    """Nearest positive root: (ray indices, t, outward normal, hit point relative to the centre) of the hits."""
    center = _vec(s.center)
    idx = _bounding_hits(o, d, center, s.radius)
    oc, dd = o[idx] - center, d[idx]
    a = np.einsum("ij,ij->i", dd, dd)
    b = np.einsum("ij,ij->i", oc, dd)
    c = np.einsum("ij,ij->i", oc, oc) - s.radius**2
    t = (-b - np.sqrt(np.maximum(b * b - a * c, 0))) / a
    hit = t > _EPS
    idx, t, oc, dd = idx[hit], t[hit], oc[hit], dd[hit]
    p = oc + t[:, None] * dd
    return idx, t, p / s.radius, p


def _hash01(ix: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer lattice point (ix, iz)."""
    h = (ix.astype(np.uint64) * np.uint64(73856093)) ^ (iz.astype(np.uint64) * np.uint64(83492791))
    h ^= np.uint64(seed * 2654435761 % 2**32)
    h ^= h >> np.uint64(13)
    h *= np.uint64(0x5BD1E995)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(0x1000000)


_LATTICE = 32  # value noise repeats every 32 lattice cells; octaves at other scales hide the period


def _value_noise(p: np.ndarray, seed: int) -> np.ndarray:
    """Trilinearly interpolated lattice noise in [0, 1], smoothstep-faded; p is Nx3 in lattice units."""
    table = np.random.default_rng(seed).random(_LATTICE**3, dtype=np.float32)
    base = np.floor(p)
    f = p - base
    f = f * f * (3 - 2 * f)
    i0 = base.astype(np.int64) % _LATTICE
    i1 = (i0 + 1) % _LATTICE
    out = np.zeros(len(p), np.float32)
    for cx, wx in ((i0[:, 0], 1 - f[:, 0]), (i1[:, 0], f[:, 0])):
        for cy, wy in ((i0[:, 1], 1 - f[:, 1]), (i1[:, 1], f[:, 1])):
            row, wxy = (cx * _LATTICE + cy) * _LATTICE, wx * wy
            out += wxy * (1 - f[:, 2]) * table[row + i0[:, 2]] + wxy * f[:, 2] * table[row + i1[:, 2]]
    return out


def _albedo(mat: Material, p: np.ndarray) -> np.ndarray:
    """Linear-light albedo Nx3 of `mat` at points p (object coordinates, metres)."""
    q = p / mat.scale
    if mat.pattern == "checker":
        mix = (np.floor(q).astype(np.int64).sum(axis=1) % 2).astype(np.float32)
    elif mat.pattern == "stripes":
        mix = 0.5 + 0.5 * np.sin(np.pi * (q[:, 0] + q[:, 1] + q[:, 2]))
    elif mat.pattern == "noise":
        mix = 0.65 * _value_noise(q, mat.seed) + 0.35 * _value_noise(4 * q, mat.seed + 1)
    elif mat.pattern == "planks":  # boards along z, each with its own tone, plus grain
        board = np.floor(q[:, 0]).astype(np.int64)
        tone = _hash01(board, np.floor(q[:, 2] / 8).astype(np.int64), mat.seed)
        grain = _value_noise(q * _vec([8.0, 8.0, 0.5]), mat.seed + 2)
        mix = 0.55 * tone + 0.45 * grain
    else:
        mix = np.zeros(len(p), np.float32)
    srgb = (1 - mix[:, None]) * _vec(mat.rgb) + mix[:, None] * _vec(mat.rgb2)
    return srgb**2.2


def _occluded(p: np.ndarray, to_light: np.ndarray, scene: Scene) -> np.ndarray:
    """Whether the segment p -> p + to_light (t in (0, 1)) hits an object."""
    blocked = np.zeros(len(p), bool)
    for obj in (*scene.boxes, *scene.spheres):
        idx, t = (_hit_box if isinstance(obj, Box) else _hit_sphere)(p, to_light, obj)[:2]
        blocked[idx[t < 1.0]] = True
    return blocked


def _sensor_mask(scene: Scene, size: tuple[int, int]) -> np.ndarray:
    """True where a Kinect-like sensor would return data: a border band and elliptical holes are missing."""
    h, w = size
    v, u = np.mgrid[0:h, 0:w]
    u, v = (u + 0.5) / w, (v + 0.5) / h
    ok = np.ones(size, bool)
    side, width = scene.border_band
    if side == "left":
        ok &= u >= width
    elif side == "right":
        ok &= u <= 1 - width
    for cx, cy, rx, ry in scene.holes:
        ok &= ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 > 1
    return ok


_NUMBERS = ("no", "a", "two", "three", "four", "five")


def _caption(scene: Scene, visible: Sequence[bool]) -> str:
    """Template caption naming the visible objects (grouped by colour and kind), the floor and the walls."""
    kinds = [(b.material.name, "box") for b in scene.boxes] + [(s.material.name, "sphere") for s in scene.spheres]
    counts: dict[tuple[str, str], int] = {}
    for kind, v in zip(kinds, visible, strict=True):
        if v:
            counts[kind] = counts.get(kind, 0) + 1
    objs = []
    for (colour, shape), count in counts.items():
        if count == 1:
            objs.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
        else:
            objs.append(f"{_NUMBERS[count]} {colour} {shape}{'es' if shape == 'box' else 's'}")
    if not objs:
        things = "an empty room"
    elif len(objs) == 1:
        things = f"a room with {objs[0]}"
    else:
        things = f"a room with {', '.join(objs[:-1])} and {objs[-1]}"
    return f"{things} on a {scene.floor.name} floor, with {scene.wall.name} walls"


def render(scene: Scene, size: tuple[int, int]) -> Rendering:
    """Ray-cast `scene` at `size` = (H, W): shaded image, camera-frame normals, depth, semantics and caption."""
    h, w = size
    cam = scene.camera
    k = cam.intrinsics(size)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    d_cam = np.stack([(u - k[0, 2]) / k[0, 0], -(v - k[1, 2]) / k[1, 1], -np.ones_like(u)], -1).reshape(-1, 3)
    rot = np.asarray(cam.rotation)
    d = _mul(d_cam, rot)
    o = np.broadcast_to(_vec(cam.position), d.shape)

    t, n, sem, local = _hit_room(o, d, _vec(scene.room_lo), _vec(scene.room_hi))
    surface = np.select([sem == FLOOR, sem == WALL], [0, 1], 2)  # index into `materials`; room: world coordinates
    materials = [scene.floor, scene.wall, scene.ceiling]
    for obj in (*scene.boxes, *scene.spheres):
        is_box = isinstance(obj, Box)
        idx, t_obj, n_obj, p_obj = (_hit_box if is_box else _hit_sphere)(o, d, obj)
        closer = t_obj < t[idx]
        sel = idx[closer]
        t[sel], n[sel], local[sel] = t_obj[closer], n_obj[closer], p_obj[closer]
        sem[sel], surface[sel] = BOX if is_box else SPHERE, len(materials)
        materials.append(obj.material)
    n = np.where((np.einsum("ij,ij->i", n, d) > 0)[:, None], -n, n)  # face the camera, whatever the geometry
    n /= np.linalg.norm(n, axis=1, keepdims=True)  # exact unit length (sphere normals come from float32 points)

    albedo = np.zeros_like(d)
    for i, mat in enumerate(materials):
        sel = surface == i
        if sel.any():
            albedo[sel] = _albedo(mat, local[sel])
    p = o + t[:, None] * d
    light = np.full(len(d), scene.ambient, np.float32)
    for pos, intensity in scene.lights:
        to_light = _vec(pos) - p
        dist = np.linalg.norm(to_light, axis=1)
        lambert = np.maximum(np.einsum("ij,ij->i", n, to_light) / dist, 0)
        front = np.flatnonzero(lambert > 0)
        lambert[front[_occluded(p[front] + 1e-4 * n[front], to_light[front], scene)]] = 0
        light += 1.6 * intensity * lambert / (1 + (dist / 4.0) ** 2)
    rgb = (albedo * light[:, None]) ** (1 / 2.2)
    rgb += 0.008 * np.random.default_rng(scene.noise_seed).standard_normal(rgb.shape, np.float32)
    image = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8).reshape(h, w, 3)

    grazing = np.abs(np.einsum("ij,ij->i", n, d)) / np.linalg.norm(d, axis=1) < 0.06
    mask = _sensor_mask(scene, size) & ~grazing.reshape(h, w) & np.isfinite(t).reshape(h, w)
    normal = np.where(mask[..., None], _mul(n, rot.T).reshape(h, w, 3), 0).astype(np.float32)  # world -> camera: R^T n
    depth = np.where(mask, np.where(np.isfinite(t), t, 0).reshape(h, w), 0).astype(np.float32)
    sem = np.where(np.isfinite(t), sem, VOID).reshape(h, w).astype(np.uint8)

    counts = np.bincount(surface, minlength=len(materials))[3:]
    visible = counts >= max(1, 0.002 * h * w)
    return Rendering(image, normal, mask, depth, sem, k, _caption(scene, visible))


def render_scene(seed: int, size: tuple[int, int] = (256, 256)) -> Rendering:
    """The scene drawn from `seed`, rendered at `size` = (H, W); identical for identical arguments."""
    return render(random_scene(np.random.default_rng(seed)), size)


# ---------------------------------------------------------------------------------------------------------------
# The NYUv2 normal layout (Bae / Diff-2-in-1)
# ---------------------------------------------------------------------------------------------------------------


def encode_normals(normal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB = round((n + 1) / 2 · 255), (0, 0, 0) where `mask` is False."""
    rgb = np.clip(np.round((normal + 1) * 0.5 * 255), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], rgb, 0).astype(np.uint8)


def scene_seed(seed: int, split: str, index: int) -> int:
    """The per-example seed `write_nyu_layout` renders example `index` of `split` with."""
    return int(np.random.SeedSequence([seed, SPLIT_CODES.get(split, 2), index]).generate_state(1)[0])


SPLIT_CODES = {"train": 0, "test": 1, "pool": 3, "val": 4}  # `scene_seed`: the unlabelled pool never draws a
# labelled scene; "val" draws held-out scenes apart from the test ones (for tuning)


def write_image_pool(root: PathLike, count: int, size: tuple[int, int], seed: int = 0) -> epath.Path:
    """Renders `count` unlabelled scenes (`split = "pool"`, disjoint from the labelled train / test scenes of the
    same seed) as `root/img/NNNNNN.png` + `root/caption/NNNNNN.txt`, the `CaptionedImages` layout the `prior` stage
    trains on; `root/DONE`, written last, marks a complete pool (a rerun reuses it)."""
    root = as_path(root)
    if (root / "DONE").exists():
        return root
    for sub in ("img", "caption"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(count), desc="rendering the unlabelled pool", unit="scene"):
        r = render_scene(scene_seed(seed, "pool", i), size)
        write_png_atomically(root / "img" / f"{i:06d}.png", r.image)
        (root / "caption" / f"{i:06d}.txt").write_text(r.caption)
    (root / "DONE").write_text(json.dumps({"count": count, "size": list(size), "seed": seed}))
    return root


def write_nyu_layout(
    root: PathLike, num_train: int, num_test: int, size: tuple[int, int] = (480, 640), seed: int = 0,
    held_out: str = "test",
) -> epath.Path:
    """Render a synthetic dataset in the public Bae / Diff-2-in-1 NYUv2 normal layout, plus depth and semantics.

    Writes `root/{train,test}/{img,norm,semseg}/NNNNNN.png`, `caption/NNNNNN.txt`, `depth/NNNNNN.npy` (float32
    metres) and the split files `root/{train,test}.txt` ("train/img/000000.png train/norm/000000.png" per line,
    no trailing newline). Example i of a split is `render_scene(scene_seed(seed, split, i), size)`, where the test
    folder's split is `held_out`: "test", or "val" for validation scenes disjoint from the test ones.

    Args:
      root: output folder (local or `gs://`), created if needed.
      num_train: number of training examples.
      num_test: number of test examples.
      size: (H, W) of every image.
      seed: dataset seed; the same seed gives the same files.
      held_out: the split the test folder's scenes are drawn from ("test" or "val").

    Returns:
      `root` as an `epath.Path`.
    """
    root = as_path(root)
    if held_out not in ("test", "val"):
        raise ValueError(f"held_out={held_out!r}: the held-out scenes are drawn from 'test' or 'val'")
    for split, count in (("train", num_train), ("test", num_test)):
        for sub in ("img", "norm", "caption", "depth", "semseg"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        lines = []
        drawn_from = held_out if split == "test" else split
        for i in tqdm(range(count), desc=f"rendering {drawn_from}", unit="scene", leave=False):
            r = render_scene(scene_seed(seed, drawn_from, i), size)
            name = f"{i:06d}"
            write_png_atomically(root / split / "img" / f"{name}.png", r.image)
            write_png_atomically(root / split / "norm" / f"{name}.png", encode_normals(r.normal, r.mask))
            write_png_atomically(root / split / "semseg" / f"{name}.png", r.semseg)
            write_npy_atomically(root / split / "depth" / f"{name}.npy", r.depth)
            (root / split / "caption" / f"{name}.txt").write_text(r.caption)
            lines.append(f"{split}/img/{name}.png {split}/norm/{name}.png")
        (root / f"{split}.txt").write_text("\n".join(lines))
    return root


class SceneSource(NyuNormals):
    """The rendered scenes as a dataset: `NyuNormals` with the semantic ids reduced as NYUD-MT's (void -> ignore,
    class k -> k - 1, so the classes are `CLASS_NAMES[1:]`)."""

    def load(self, index: int) -> dict[str, Any]:
        ex = super().load(index)
        if keys.SEMSEG in ex:
            sem = ex[keys.SEMSEG]
            ex[keys.SEMSEG] = np.where(sem == VOID, keys.IGNORE_INDEX, sem - 1).astype(np.int32)
        return ex


def make_source(config: ml_collections.ConfigDict, split: str, *, size: tuple[int, int] | None,
                label_keys: Sequence[str], workdir: epath.PathLike, seed: int = 0) -> SceneSource:
    """`config.data.name = "scenes"`: procedural rooms (`config.scenes`: counts and size) rendered once into
    `<workdir>/scenes` in the NYUv2 layout (normals, depth, semantics), then read like NYUv2. `config.scenes.seed`
    draws the scenes (the run's `seed` when it is absent), so runs of different training seeds share one dataset.
    `config.scenes.held_out = "val"` puts validation scenes, disjoint from the test ones, in the test split (written
    to `<workdir>/scenes_val`): what the method's settings are tuned on."""
    cfg = config.scenes
    seed = cfg.get("seed", seed)
    held_out = cfg.get("held_out", "test")
    root = as_path(workdir) / ("scenes" if held_out == "test" else f"scenes_{held_out}")
    if not (root / "test.txt").exists():  # written last
        print(f"rendering {cfg.num_train} + {cfg.num_test} ({held_out}) procedural scenes into {root}")
    process_zero_writes("scenes", lambda: (root / "test.txt").exists() or write_nyu_layout(
        root, cfg.num_train, cfg.num_test, tuple(cfg.size), seed, held_out))
    return SceneSource(root, split, size=size, resize=config.resize, fallback_caption=config.fallback_caption,
                       extra_keys=[k for k in label_keys if k in EXTRA_KEYS])
