"""lmvic: multi-view image compression with 3D Gaussian Splatting geometry priors."""
from lmvic.compat import install as _install_torchvision_hook

_install_torchvision_hook()

__version__ = "0.1.0"
#: Bumped whenever any cached or written format changes; caches of another version are re-run.
FORMAT_VERSION = 1
