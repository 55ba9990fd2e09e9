// Python bindings of the CPU splatting extension (project.cpp, raster.cpp).

#include "splat.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("project_forward", &project_forward, "EWA projection, opacities and SH colours (forward)");
    mod.def("project_backward", &project_backward, "EWA projection, opacities and SH colours (backward)");
    mod.def("intersect_tiles", &intersect_tiles, "per-tile depth-sorted Gaussian lists");
    mod.def("rasterize_forward", &rasterize_forward, "rasterise Gaussians to pixels (forward)");
    mod.def("rasterize_backward", &rasterize_backward, "rasterise Gaussians to pixels (backward)");
}
