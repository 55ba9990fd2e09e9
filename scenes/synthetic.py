"""The embedded default scene: procedural textured objects ray-cast from cameras on an arc.

Nothing is stored: a seed determines everything. The world has y up; a back wall (plane z = -3)
and a floor (plane y = -1) surround two spheres and a box at different depths. Every surface is
coloured by a solid (3-D) multi-octave value-noise texture, so it looks the same from every view
and has the corners SIFT needs; shading is Lambertian with a fixed light, hence view-independent.
A :class:`PhotoTexture` lays photographs on the surfaces instead (photographic content with exact
depth and poses, for training). The ray caster is exact (closed-form ray/plane, ray/sphere and
ray/box intersections) and vectorised in torch. Images are rendered with 2x2 supersampling; ground-truth depth is the camera
z of the surface hit by each pixel-centre ray.

Output of :func:`generate`::

    OUT/images/0000.png ...          the photos
    OUT/depth_gt/0000.npy ...        float32 [H, W] camera-z depth of every pixel
    OUT/gt/cameras.json              per view: K, world-to-camera T (OpenCV axes), width, height
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geometry.cameras import intrinsics, look_at
from pipelines.cache import atomic_write_json

_NO_HIT = math.inf


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Box:
    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Plane:
    normal: tuple[float, float, float]  # unit, pointing towards the cameras
    offset: float  # plane: normal . x = offset
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple = (
        Plane((0.0, 0.0, 1.0), -3.0, (0.85, 0.75, 0.55)),
        Plane((0.0, 1.0, 0.0), -1.0, (0.45, 0.6, 0.8)),
        Sphere((-0.9, -0.2, 0.3), 0.7, (0.9, 0.35, 0.3)),
        Sphere((1.0, 0.1, -1.0), 0.8, (0.35, 0.8, 0.4)),
        Box((0.3, -0.6, 1.3), (0.4, 0.4, 0.4), (0.8, 0.8, 0.3)),
    )
    light: tuple[float, float, float] = (0.4, 0.8, 0.45)


@dataclass(frozen=True)
class ArcCameras:
    """Cameras on a horizontal arc around the origin, all looking at ``target``."""

    n_views: int = 24
    width: int = 320
    height: int = 240
    radius: float = 5.0
    height_above: float = 0.6
    arc_degrees: float = 80.0
    fov_degrees: float = 60.0
    target: tuple[float, float, float] = field(default=(0.0, -0.2, 0.0))

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """K [3, 3] shared by all views and world-to-camera T [N, 4, 4], in arc order."""
        f = 0.5 * self.width / math.tan(math.radians(self.fov_degrees) / 2)
        K = intrinsics(f, f, self.width / 2, self.height / 2)
        angles = np.radians(np.linspace(-self.arc_degrees / 2, self.arc_degrees / 2, self.n_views))
        T = np.stack([
            look_at(np.array([self.radius * math.sin(a), self.height_above, self.radius * math.cos(a)]),
                    np.array(self.target), up=np.array([0.0, 1.0, 0.0]))
            for a in angles
        ])
        return K, T


# ---------------------------------------------------------------- ray casting
def pixel_rays(K: np.ndarray, T: np.ndarray, width: int, height: int, supersample: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World-space rays through (sub)pixel centres.

    Returns origin [3], unit directions [H*s, W*s, 3] and the camera-z of each unit direction
    [H*s, W*s] (so depth = t * dz), all float64.
    """
    s = supersample
    u = (torch.arange(width * s, dtype=torch.float64) + 0.5) / s
    v = (torch.arange(height * s, dtype=torch.float64) + 0.5) / s
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pix = torch.stack([uu, vv, torch.ones_like(uu)], -1)
    d_cam = pix @ torch.from_numpy(np.linalg.inv(K)).T
    d_cam = d_cam / d_cam.norm(dim=-1, keepdim=True)
    R = torch.from_numpy(T[:3, :3])
    origin = -R.T @ torch.from_numpy(T[:3, 3])
    return origin, d_cam @ R, d_cam[..., 2]


def _hit_plane(o, d, p: Plane):
    n = torch.tensor(p.normal, dtype=torch.float64)
    denom = d @ n
    t = (p.offset - o @ n) / denom
    t = torch.where((denom < -1e-12) & (t > 1e-9), t, torch.full_like(t, _NO_HIT))
    return t, n.expand_as(d)


def _hit_sphere(o, d, s: Sphere):
    c = torch.tensor(s.centre, dtype=torch.float64)
    oc = o - c
    b = d @ oc
    disc = b * b - (oc @ oc - s.radius ** 2)
    t = -b - torch.sqrt(disc.clamp_min(0))
    t = torch.where((disc >= 0) & (t > 1e-9), t, torch.full_like(t, _NO_HIT))
    normal = o + t.unsqueeze(-1).clamp_max(1e6) * d - c
    return t, normal / s.radius


def _hit_box(o, d, b: Box):
    c = torch.tensor(b.centre, dtype=torch.float64)
    h = torch.tensor(b.half, dtype=torch.float64)
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t0 = (c - h - o) * inv
    t1 = (c + h - o) * inv
    tmin = torch.minimum(t0, t1)
    t_near, axis = tmin.max(dim=-1)
    t_far = torch.maximum(t0, t1).min(dim=-1).values
    t = torch.where((t_near <= t_far) & (t_near > 1e-9), t_near, torch.full_like(t_near, _NO_HIT))
    normal = torch.nn.functional.one_hot(axis, 3).to(torch.float64) * -torch.sign(d)
    return t, normal


_HIT = {Plane: _hit_plane, Sphere: _hit_sphere, Box: _hit_box}


def cast(origin: torch.Tensor, dirs: torch.Tensor, spec: SceneSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest hit of each ray: distance t [...], object index [...] (-1 = none), normal [..., 3]."""
    best_t = torch.full(dirs.shape[:-1], _NO_HIT, dtype=torch.float64)
    best_id = torch.full(dirs.shape[:-1], -1, dtype=torch.long)
    best_n = torch.zeros_like(dirs)
    for i, obj in enumerate(spec.objects):
        t, n = _HIT[type(obj)](origin, dirs, obj)
        closer = t < best_t
        best_t = torch.where(closer, t, best_t)
        best_id = torch.where(closer, torch.full_like(best_id, i), best_id)
        best_n = torch.where(closer.unsqueeze(-1), n, best_n)
    return best_t, best_id, best_n


# ---------------------------------------------------------------- texture
class SolidNoise:
    """Multi-octave 3-D value noise on a periodic random lattice (deterministic for a seed)."""

    def __init__(self, seed: int, size: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self.table = torch.rand((4, size, size, size), generator=g)  # 4 independent fields

    def __call__(self, p: torch.Tensor, field: int, freq: float) -> torch.Tensor:
        """Smoothly interpolated noise in [0, 1] at points p [..., 3]."""
        x = p.to(torch.float32) * freq
        i0 = torch.floor(x)
        f = x - i0
        f = f * f * (3 - 2 * f)
        n = self.size
        i0 = i0.long() % n
        i1 = (i0 + 1) % n
        table = self.table[field].reshape(-1)
        x0, y0, z0 = (i0[..., k] for k in range(3))
        x1, y1, z1 = (i1[..., k] for k in range(3))
        fx, fy, fz = (f[..., k] for k in range(3))

        def at(ix, iy, iz):
            return table[(ix * n + iy) * n + iz]

        def lerp(a, b, w):
            return a + w * (b - a)

        def row(iy, iz):
            return lerp(at(x0, iy, iz), at(x1, iy, iz), fx)

        return lerp(lerp(row(y0, z0), row(y1, z0), fy), lerp(row(y0, z1), row(y1, z1), fy), fz)

    def fractal(self, p: torch.Tensor, field: int, base_freq: float, octaves: int) -> torch.Tensor:
        total, amp, norm = torch.zeros(p.shape[:-1]), 1.0, 0.0
        for k in range(octaves):
            total = total + amp * self(p, field, base_freq * 2 ** k)
            norm += amp
            amp *= 0.55
        return total / norm

    def albedo(self, points: torch.Tensor, ids: torch.Tensor, spec: SceneSpec) -> torch.Tensor:
        """Procedural albedo in [0, 1] [..., 3] of surface points [..., 3] of objects ``ids`` [...]: each
        object's colour modulated by fractal detail, blotches, spots and a colour tint."""
        base = torch.tensor([o.colour for o in spec.objects], dtype=torch.float32)[ids.clamp_min(0)]
        detail = self.fractal(points, 0, 2.0, 5)
        blotch = self(points, 1, 0.7)
        spots = (self(points, 2, 9.0) > 0.62).to(torch.float32)
        tint = torch.stack([self(points, 3, 1.3 + 0.4 * c) for c in range(3)], -1)
        albedo = base * (0.35 + 0.9 * detail.unsqueeze(-1)) * (0.7 + 0.6 * blotch.unsqueeze(-1))
        return (albedo * (1 - 0.55 * spots.unsqueeze(-1)) + 0.25 * (tint - 0.5)).clamp(0, 1)


def surface_coordinates(points: torch.Tensor, obj) -> torch.Tensor:
    """World-unit 2-D coordinates [..., 2] on the surface of ``obj`` of points [..., 3] lying on it.

    A plane: the point in an orthonormal basis of the plane. A sphere: longitude and latitude times
    the radius (arc lengths; the seam faces away from +z, where the arc cameras are). A box: each
    face's two in-plane coordinates from the centre (the face is the axis the point is furthest out on).
    """
    if isinstance(obj, Plane):
        n = torch.tensor(obj.normal, dtype=points.dtype)
        helper = torch.tensor([0.0, 1.0, 0.0] if abs(obj.normal[1]) < 0.9 else [1.0, 0.0, 0.0], dtype=points.dtype)
        t1 = torch.linalg.cross(helper, n)
        t1 = t1 / t1.norm()
        t2 = torch.linalg.cross(t1, n)  # on a wall: right and down, so photos stand upright
        return torch.stack([points @ t1, points @ t2], -1)
    if isinstance(obj, Sphere):
        d = (points - torch.tensor(obj.centre, dtype=points.dtype)) / obj.radius
        lon = torch.atan2(d[..., 0], d[..., 2])
        lat = torch.asin(d[..., 1].clamp(-1, 1))
        return obj.radius * torch.stack([lon, lat], -1)
    offset = points - torch.tensor(obj.centre, dtype=points.dtype)
    face = (offset / torch.tensor(obj.half, dtype=points.dtype)).abs().argmax(dim=-1)
    others = torch.tensor([[1, 2], [0, 2], [0, 1]])[face]
    return torch.gather(offset, -1, others)


class PhotoTexture:
    """Albedo from photographs: object ``k`` wears photo ``k mod n`` (after a seeded shuffle), laid on its
    :func:`surface_coordinates` at ``texels_per_unit`` photo pixels per world unit from a seeded
    offset, repeated mirrored and sampled bilinearly, so a scene has photographic content (edges,
    textures, noise) and still exact depth. ``photos``: uint8 RGB arrays [H, W, 3]."""

    def __init__(self, photos: list[np.ndarray], seed: int = 0, texels_per_unit: float = 80.0):
        if not photos:
            raise ValueError("PhotoTexture needs at least one photo")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(photos), generator=g).tolist()
        self.photos = [torch.from_numpy(np.array(photos[i][..., :3])).to(torch.float32) / 255 for i in order]
        self.offsets = torch.rand((len(photos), 2), generator=g)
        self.texels_per_unit = texels_per_unit

    @classmethod
    def from_files(cls, paths: list[Path], seed: int = 0, texels_per_unit: float = 80.0) -> "PhotoTexture":
        return cls([np.asarray(Image.open(p).convert("RGB")) for p in paths], seed, texels_per_unit)

    def sample(self, photo: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """``photo`` [H, W, 3] at texel coordinates uv [..., 2] (x, y), mirrored repeat, bilinear: [..., 3]."""
        h, w = photo.shape[:2]

        def mirror(x: torch.Tensor, n: int) -> torch.Tensor:
            x = torch.remainder(x, 2 * (n - 1))
            return torch.where(x > n - 1, 2 * (n - 1) - x, x)

        x, y = mirror(uv[..., 0], w), mirror(uv[..., 1], h)
        x0, y0 = x.floor().long().clamp(0, w - 2), y.floor().long().clamp(0, h - 2)
        fx, fy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
        top = photo[y0, x0] * (1 - fx) + photo[y0, x0 + 1] * fx
        bottom = photo[y0 + 1, x0] * (1 - fx) + photo[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    def albedo(self, points: torch.Tensor, ids: torch.Tensor, spec: SceneSpec) -> torch.Tensor:
        """Albedo in [0, 1] [..., 3] of surface points [..., 3] of objects ``ids`` [...] (-1: black)."""
        out = torch.zeros(points.shape[:-1] + (3,), dtype=torch.float32)
        for k, obj in enumerate(spec.objects):
            on = ids == k
            if on.any():
                photo = self.photos[k % len(self.photos)]
                offset = self.offsets[k % len(self.photos)] * torch.tensor(photo.shape[1::-1])
                uv = surface_coordinates(points[on], obj).to(torch.float32) * self.texels_per_unit + offset
                out[on] = self.sample(photo, uv)
        return out


Texture = SolidNoise | PhotoTexture


def shade(points: torch.Tensor, ids: torch.Tensor, normals: torch.Tensor, spec: SceneSpec, texture: Texture) -> torch.Tensor:
    """RGB in [0, 1] [..., 3] of surface points: the texture's albedo times Lambertian shading."""
    albedo = texture.albedo(points, ids, spec)
    light = torch.tensor(spec.light, dtype=torch.float32)
    light = light / light.norm()
    lambert = (normals.to(torch.float32) @ light).clamp_min(0)
    return (albedo * (0.4 + 0.6 * lambert.unsqueeze(-1))).clamp(0, 1)


def render_view(K: np.ndarray, T: np.ndarray, width: int, height: int, spec: SceneSpec, texture: Texture,
                supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One view: uint8 RGB [H, W, 3] (supersampled) and float32 camera-z depth [H, W] (0 = no surface)."""
    origin, dirs, dz = pixel_rays(K, T, width, height, supersample)
    t, ids, normals = cast(origin, dirs, spec)
    rgb = shade(origin + t.clamp_max(1e6).unsqueeze(-1) * dirs, ids, normals, spec, texture)
    rgb = torch.where((ids >= 0).unsqueeze(-1), rgb, torch.zeros_like(rgb))
    s = supersample
    rgb = rgb.reshape(height, s, width, s, 3).mean(dim=(1, 3))
    origin, dirs, dz = pixel_rays(K, T, width, height, 1)
    t, ids, _ = cast(origin, dirs, spec)
    depth = torch.where(ids >= 0, t * dz, torch.zeros_like(t))
    image = (rgb.numpy() * 255 + 0.5).astype(np.uint8)
    return image, depth.to(torch.float32).numpy()


def generate(out_dir: Path | str, cameras: ArcCameras = ArcCameras(), seed: int = 0, spec: SceneSpec = SceneSpec(),
             progress=None, texture: Texture | None = None) -> Path:
    """Render the scene into ``out_dir`` (images/, depth_gt/, gt/cameras.json); atomic as a whole.
    ``texture``: the surfaces' albedo, by default the procedural ``SolidNoise(seed)``."""
    out_dir = Path(out_dir).resolve()
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "depth_gt", "gt"):
        (tmp / sub).mkdir(parents=True)
    texture = SolidNoise(seed) if texture is None else texture
    K, Ts = cameras.matrices()
    views = []
    indices = range(len(Ts)) if progress is None else progress(range(len(Ts)), desc="rendering synthetic views")
    for i in indices:
        image, depth = render_view(K, Ts[i], cameras.width, cameras.height, spec, texture)
        name = f"{i:04d}.png"
        Image.fromarray(image).save(tmp / "images" / name)
        np.save(tmp / "depth_gt" / f"{i:04d}.npy", depth)
        views.append({"name": name, "width": cameras.width, "height": cameras.height,
                      "K": K.tolist(), "T": Ts[i].tolist()})
    atomic_write_json(tmp / "gt" / "cameras.json", {
        "convention": "OpenCV: world-to-camera T, x right, y down, z forward; pixel centres at +0.5; depth = camera z",
        "seed": seed, "texture": type(texture).__name__, "views": views})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def photo_files(sources: list[Path]) -> list[Path]:
    """Image files named by ``sources``: files as given, folders searched recursively (sorted)."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        else:
            files.append(source)
    return files


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m scenes.synthetic", description="Render a synthetic scene (images, "
                                "exact depth, cameras) for tests or joint-codec training (lmvic train-joint).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="scene folder to write (replaced if it exists)")
    p.add_argument("--views", type=int, default=24, help="number of cameras on the arc")
    p.add_argument("--width", type=int, default=320, help="image width in pixels")
    p.add_argument("--height", type=int, default=240, help="image height in pixels")
    p.add_argument("--arc", type=float, default=80.0, help="degrees the cameras span")
    p.add_argument("--seed", type=int, default=0, help="seed of the texture (and of the photos' placement)")
    p.add_argument("--photos", nargs="*", type=Path, default=[],
                   help="photos (files or folders) laid on the surfaces (PhotoTexture); none: procedural texture")
    args = p.parse_args(argv)
    texture = None
    if args.photos:
        files = photo_files(args.photos)
        if not files:
            p.error(f"no .png/.jpg photos in {' '.join(map(str, args.photos))}")
        try:
            texture = PhotoTexture.from_files(files, seed=args.seed)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            p.error(f"cannot read the photos: {exc}")
    print(generate(args.out, ArcCameras(n_views=args.views, width=args.width, height=args.height,
                                        arc_degrees=args.arc), seed=args.seed, texture=texture))


if __name__ == "__main__":
    main()
