// Shared by the CPU splatting sources: the extension's functions (defined in project.cpp and
// raster.cpp, bound in bindings.cpp) and the two builds of the per-element kernels, for the
// baseline target and for AVX2 + FMA, chosen once per process at run time.
#pragma once

#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor opacities, torch::Tensor coeffs, torch::Tensor viewmats,
                                           torch::Tensor Ks, int64_t sh_degree, int64_t width, int64_t height,
                                           double eps2d, double near_plane, double far_plane, double radius_clip,
                                           bool calc_compensations, bool packed);
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor opacities, torch::Tensor coeffs, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t sh_degree, int64_t width, int64_t height,
                                            double eps2d, torch::Tensor entry_of, torch::Tensor compensations,
                                            torch::Tensor colors, torch::Tensor v_means2d, torch::Tensor v_depths,
                                            torch::Tensor v_conics, torch::Tensor v_opacities,
                                            torch::Tensor v_colors);
std::vector<torch::Tensor> intersect_tiles(torch::Tensor means2d, torch::Tensor radii, torch::Tensor depths,
                                           torch::Tensor image_ids, int64_t n_images, int64_t tile_size,
                                           int64_t tiles_x, int64_t tiles_y);
std::vector<torch::Tensor> rasterize_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                             torch::Tensor opacities, torch::Tensor depths, torch::Tensor backgrounds,
                                             int64_t n_images, int64_t width, int64_t height, int64_t tile_size,
                                             torch::Tensor tile_offsets, torch::Tensor flatten_ids);
std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                              torch::Tensor opacities, torch::Tensor backgrounds, int64_t n_images,
                                              int64_t width, int64_t height, int64_t tile_size,
                                              torch::Tensor tile_offsets, torch::Tensor flatten_ids,
                                              torch::Tensor render_alphas, torch::Tensor last_ids,
                                              torch::Tensor v_render_colors, torch::Tensor v_render_alphas,
                                              bool absgrad);

#define LMVIC_INLINE inline __attribute__((always_inline))

// On other architectures than x86 the second build is the baseline build too and is never chosen.
#if defined(__x86_64__) || defined(__i386__)
#define LMVIC_AVX2 __attribute__((target("avx2,fma")))
inline bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}
#else
#define LMVIC_AVX2
inline bool has_avx2() { return false; }
#endif
