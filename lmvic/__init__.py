"""lmvic: multi-view image compression with 3D Gaussian Splatting geometry priors."""
from lmvic.compat import install as _install_torchvision_hook

_install_torchvision_hook()

__version__ = "0.1.0"
#: Version of the scene container (``lmvic.bitstream``): 4 since session 11 (joint mode: the ``image.prior``
#: stream, the codec's trust tolerance), 3 since session 10 (the digest of the weights
#: that coded the file), 2 since session 9 (float32 cameras, varint lengths); files of another
#: version are refused with a clear error.
FORMAT_VERSION = 4
#: Version of the stages' cache layout (``pipelines.cache``); caches of another version are re-run.
CACHE_VERSION = 1
