"""The synthetic renderer against closed-form depth, and its determinism."""
import json
import math

import numpy as np
import pytest
import torch

from geometry.cameras import intrinsics, look_at
from scenes.synthetic import ArcCameras, PhotoTexture, Plane, SceneSpec, SolidNoise, Sphere, generate, render_view

K = intrinsics(200.0, 200.0, 80.0, 60.0)


def test_plane_depth_is_its_distance_everywhere():
    """A fronto-parallel plane at distance d has camera-z depth d at every pixel."""
    spec = SceneSpec(objects=(Plane((0.0, 0.0, 1.0), -2.5, (0.5, 0.5, 0.5)),))
    T = look_at(np.array([0.0, 0.0, 4.0]), np.array([0.0, 0.0, 0.0]), up=np.array([0.0, 1.0, 0.0]))
    _, depth = render_view(K, T, 160, 120, spec, SolidNoise(0), supersample=1)
    np.testing.assert_allclose(depth, 6.5, rtol=1e-6)


def test_photo_on_a_fronto_parallel_wall_is_the_photo_at_one_texel_per_pixel():
    """A wall at depth d seen head-on, with f/d texels per world unit: pixel (u, v) shows the photo at
    texel (u + 0.5 - cx + ox, v + 0.5 - cy + oy) (bilinear, mirrored beyond the edges, as scipy's
    map_coordinates computes it), times the constant Lambert factor of the wall."""
    from scipy.ndimage import map_coordinates

    photo = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    wall = Plane((0.0, 0.0, 1.0), -2.5, (0.5, 0.5, 0.5))
    spec = SceneSpec(objects=(wall,))
    texture = PhotoTexture([photo], seed=1, texels_per_unit=200.0 / 6.5)
    T = look_at(np.array([0.0, 0.0, 4.0]), np.array([0.0, 0.0, 0.0]), up=np.array([0.0, 1.0, 0.0]))
    image, _ = render_view(K, T, 160, 120, spec, texture, supersample=1)
    ox, oy = (texture.offsets[0] * torch.tensor([70, 50])).tolist()
    v, u = np.mgrid[0:120, 0:160]
    coords = [v + 0.5 - 60 + oy, u + 0.5 - 80 + ox]
    expected = np.stack([map_coordinates(photo[..., c].astype(np.float64), coords, order=1, mode="mirror")
                         for c in range(3)], -1)
    light = np.array(spec.light) / np.linalg.norm(spec.light)
    expected = expected * (0.4 + 0.6 * light[2])
    assert np.abs(image - expected).max() <= 1.0  # the render rounds to uint8


def test_sphere_depth_matches_the_closed_form():
    """A sphere of radius r at distance c on the optical axis: z = t * d_z with t the ray/sphere root."""
    r, c = 1.0, 5.0
    spec = SceneSpec(objects=(Sphere((0.0, 0.0, 0.0), r, (0.5, 0.5, 0.5)),))
    T = look_at(np.array([0.0, 0.0, c]), np.array([0.0, 0.0, 0.0]), up=np.array([0.0, 1.0, 0.0]))
    _, depth = render_view(K, T, 160, 120, spec, SolidNoise(0), supersample=1)
    v, u = np.mgrid[0:120, 0:160]
    x, y = (u + 0.5 - 80) / 200, (v + 0.5 - 60) / 200
    n = np.sqrt(x ** 2 + y ** 2 + 1)
    cos = 1 / n  # angle between the ray and the axis
    disc = (c * cos) ** 2 - (c ** 2 - r ** 2)
    hit = disc >= 0
    t = c * cos - np.sqrt(np.where(hit, disc, 0))
    expected = np.where(hit, t * cos, 0)
    assert hit.sum() > 1000
    np.testing.assert_allclose(depth[hit], expected[hit], rtol=1e-4)
    assert (depth[~hit] == 0).all()
    assert depth[60, 80] == pytest.approx(c - r, rel=1e-4)


def test_generation_is_deterministic_and_complete(tmp_path):
    cams = ArcCameras(n_views=3, width=96, height=72)
    a = generate(tmp_path / "a", cams, seed=5)
    b = generate(tmp_path / "b", cams, seed=5)
    for name in ("0000.png", "0002.png"):
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    depth = np.load(a / "depth_gt" / "0001.npy")
    assert depth.shape == (72, 96) and (depth > 0).all()
    assert not list(tmp_path.glob(".tmp-*"))


def test_depth_is_consistent_with_cameras_across_views():
    """A pixel back-projected with its GT depth lands, in another view, on a pixel whose GT depth
    equals the point's z there (the scene is opaque and the point visible in both)."""
    cams = ArcCameras(n_views=2, width=160, height=120, arc_degrees=10.0)
    Kc, T = cams.matrices()
    spec, noise = SceneSpec(), SolidNoise(0)
    _, d0 = render_view(Kc, T[0], 160, 120, spec, noise, supersample=1)
    _, d1 = render_view(Kc, T[1], 160, 120, spec, noise, supersample=1)
    u, v = 80, 60
    X = np.linalg.inv(T[0]) @ np.append(d0[v, u] * np.linalg.inv(Kc) @ [u + 0.5, v + 0.5, 1], 1)
    x1 = T[1] @ X
    p1 = Kc @ x1[:3] / x1[2]
    u1, v1 = int(math.floor(p1[0])), int(math.floor(p1[1]))
    assert d1[v1, u1] == pytest.approx(x1[2], rel=2e-2)


def test_command_line_renders_a_photo_textured_scene_and_refuses_missing_photos(tmp_path, capsys):
    from PIL import Image

    from scenes.synthetic import main

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "photos" / "a.png")
    main([str(tmp_path / "scene"), "--views", "2", "--width", "64", "--height", "48", "--photos", str(tmp_path / "photos")])
    recorded = json.loads((tmp_path / "scene" / "gt" / "cameras.json").read_text())
    assert recorded["texture"] == "PhotoTexture" and len(recorded["views"]) == 2
    assert np.asarray(Image.open(tmp_path / "scene" / "images" / "0001.png")).std() > 10  # a picture, not a blank
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for photos in ("empty", "bad.png"):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path / "other"), "--views", "2", "--photos", str(tmp_path / photos)])
        assert exit_.value.code == 2 and not (tmp_path / "other").exists()
    assert "no .png/.jpg photos" in capsys.readouterr().err
