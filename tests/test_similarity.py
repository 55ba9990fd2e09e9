import numpy as np
from scipy.spatial.transform import Rotation

from geometry.similarity import umeyama


def test_umeyama_recovers_a_known_similarity_exactly():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    R = Rotation.random(random_state=1).as_matrix()
    dst = 2.5 * src @ R.T + [1.0, -2.0, 0.5]
    s, R_est, t = umeyama(src, dst)
    assert abs(s - 2.5) < 1e-10
    np.testing.assert_allclose(R_est, R, atol=1e-10)
    np.testing.assert_allclose(t, [1.0, -2.0, 0.5], atol=1e-10)


def test_umeyama_never_returns_a_reflection():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(10, 3))
    dst = src * [1, 1, -1]  # a mirror image: best proper rotation, det +1
    _, R, _ = umeyama(src, dst)
    assert np.linalg.det(R) > 0
