// CPU tile rasteriser for 3D Gaussian splatting (forward and hand-written backward).
//
// It computes the same function as gsplat's CUDA kernels (RasterizeToPixels3DGSFwd/Bwd):
// 16x16 tiles, per-tile lists sorted front to back by depth, alpha = min(0.999, o * exp(-sigma)),
// contributions with alpha < 1/255 skipped, a pixel stops before the Gaussian that would take its
// transmittance to <= 1e-4, pixel centres at (u + 0.5, v + 0.5). It additionally reports the
// median depth: the z of the first Gaussian after which the transmittance drops below 0.5.
//
// Layout: the M "entries" are the projected Gaussians of all images, flattened ([I*N] dense or
// [nnz] packed); image_ids[M] names the image of every entry. Work is parallel over tiles with
// OpenMP. Inside a tile the loop runs Gaussian-major over the tile's pixel block, visiting per row
// only the pixels inside the Gaussian's alpha >= 1/255 ellipse (with a margin; the exact per-pixel
// test then decides, so the result equals visiting every pixel of the tile).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

constexpr float kAlphaThreshold = 1.f / 255.f;
constexpr float kMaxAlpha = 0.999f;
constexpr float kTransmittanceMin = 1e-4f;
constexpr float kMedianLevel = 0.5f;

struct Splat {
    float x, y;     // 2-D mean (pixels)
    float a, b, c;  // conic: sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy
    float opacity;
};

struct TileBox {
    int x0, y0, x1, y1;  // pixel block of the tile, [x0, x1) x [y0, y1)
};

// sigma and alpha of a splat at a pixel centre; identical code in forward and backward.
inline bool evaluate(const Splat &s, float px, float py, float &sigma, float &vis, float &alpha) {
    const float dx = s.x - px;
    const float dy = s.y - py;
    sigma = 0.5f * (s.a * dx * dx + s.c * dy * dy) + s.b * dx * dy;
    vis = std::exp(-sigma);
    alpha = std::min(kMaxAlpha, s.opacity * vis);
    return !(sigma < 0.f || alpha < kAlphaThreshold);
}

// Largest sigma at which alpha can still reach the threshold, or < 0 when the splat never does.
// The margin (about 0.1 % of the radius) covers float rounding of the ellipse spans below, so the
// spans are a superset of the pixels the exact per-pixel test accepts.
inline float sigma_limit(float opacity) {
    if (!(opacity >= kAlphaThreshold)) return -1.f;
    const float s = std::log(opacity / kAlphaThreshold);
    return s + 1e-2f + 1e-3f * s;
}

// Rows of the tile that the splat's ellipse sigma <= smax touches.
inline bool row_range(const Splat &s, float smax, const TileBox &t, int &r0, int &r1) {
    const float det = s.a * s.c - s.b * s.b;
    if (!(det > 0.f) || !(s.a > 0.f)) {  // degenerate conic: visit the whole tile
        r0 = t.y0;
        r1 = t.y1;
        return true;
    }
    const float half_h = std::sqrt(2.f * smax * s.a / det);
    // pixel centres row + 0.5 in [y - half_h, y + half_h]
    r0 = std::max(t.y0, (int)std::ceil(s.y - half_h - 0.5f));
    r1 = std::min(t.y1, (int)std::floor(s.y + half_h - 0.5f) + 1);
    return r0 < r1;
}

// Columns of row `row` inside the ellipse sigma <= smax.
inline bool col_range(const Splat &s, float smax, const TileBox &t, int row, int &c0, int &c1) {
    const float det = s.a * s.c - s.b * s.b;
    if (!(det > 0.f) || !(s.a > 0.f)) {
        c0 = t.x0;
        c1 = t.x1;
        return true;
    }
    const float dy = s.y - ((float)row + 0.5f);
    const float bdy = s.b * dy;
    const float disc = bdy * bdy - s.a * (s.c * dy * dy - 2.f * smax);
    if (disc < 0.f) return false;
    const float root = std::sqrt(disc);
    // dx = x_mean - px in [(-bdy - root) / a, (-bdy + root) / a]
    const float px_lo = s.x - (-bdy + root) / s.a;
    const float px_hi = s.x - (-bdy - root) / s.a;
    c0 = std::max(t.x0, (int)std::ceil(px_lo - 0.5f));
    c1 = std::min(t.x1, (int)std::floor(px_hi - 0.5f) + 1);
    return c0 < c1;
}

void check_cpu_float(const torch::Tensor &t, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Image and tile geometry shared by the forward and backward passes.
struct Grid {
    int64_t n_images, width, height, tile_size, tiles_x, tiles_y;

    Grid(int64_t n, int64_t w, int64_t h, int64_t ts)
        : n_images(n), width(w), height(h), tile_size(ts), tiles_x((w + ts - 1) / ts), tiles_y((h + ts - 1) / ts) {}
    int64_t tiles_per_image() const { return tiles_x * tiles_y; }
    int64_t n_tiles() const { return n_images * tiles_per_image(); }
    int64_t image_of(int64_t tile) const { return tile / tiles_per_image(); }
    TileBox box(int64_t tile) const {
        const int64_t t = tile % tiles_per_image();
        const int tx = (int)(t % tiles_x), ty = (int)(t / tiles_x), ts = (int)tile_size;
        return TileBox{tx * ts, ty * ts, std::min((int)width, (tx + 1) * ts), std::min((int)height, (ty + 1) * ts)};
    }
};

// Read-only per-entry inputs of the compositor and the tile lists.
struct Entries {
    const float *means2d, *conics, *colors, *opacities, *backgrounds;  // backgrounds may be null
    int64_t D;
    const int32_t *offsets, *ids;

    Entries(const torch::Tensor &means2d_, const torch::Tensor &conics_, const torch::Tensor &colors_,
            const torch::Tensor &opacities_, const torch::Tensor &backgrounds_, const torch::Tensor &offsets_,
            const torch::Tensor &ids_) {
        check_cpu_float(means2d_, "means2d");
        check_cpu_float(conics_, "conics");
        check_cpu_float(colors_, "colors");
        check_cpu_float(opacities_, "opacities");
        means2d = means2d_.data_ptr<float>();
        conics = conics_.data_ptr<float>();
        colors = colors_.data_ptr<float>();
        opacities = opacities_.data_ptr<float>();
        D = colors_.size(-1);
        backgrounds = nullptr;
        if (backgrounds_.numel() > 0) {
            check_cpu_float(backgrounds_, "backgrounds");
            backgrounds = backgrounds_.data_ptr<float>();
        }
        offsets = offsets_.data_ptr<int32_t>();
        ids = ids_.data_ptr<int32_t>();
    }
    Splat splat(int64_t g) const {
        return Splat{means2d[2 * g], means2d[2 * g + 1], conics[3 * g], conics[3 * g + 1], conics[3 * g + 2],
                     opacities[g]};
    }
};

// Calls f(row, col) for every pixel of the tile inside the splat's alpha >= 1/255 ellipse (a
// superset: the caller's exact test decides). Nothing when the splat can never reach it.
template <class F>
inline void for_each_covered_pixel(const Splat &s, const TileBox &box, F &&f) {
    const float smax = sigma_limit(s.opacity);
    if (smax < 0.f) return;
    int r0, r1;
    if (!row_range(s, smax, box, r0, r1)) return;
    for (int row = r0; row < r1; ++row) {
        int c0, c1;
        if (!col_range(s, smax, box, row, c0, c1)) continue;
        for (int col = c0; col < c1; ++col) f(row, col);
    }
}

}  // namespace

// Tile lists: for every (image, tile) the entries whose radius box touches it, sorted by depth.
// Returns (tile_offsets [I*tiles_y*tiles_x + 1] int32, flatten_ids [n_isects] int32).
std::vector<torch::Tensor> intersect_tiles(torch::Tensor means2d,   // [M, 2]
                                           torch::Tensor radii,     // [M, 2] int32
                                           torch::Tensor depths,    // [M]
                                           torch::Tensor image_ids, // [M] int32
                                           int64_t n_images, int64_t tile_size, int64_t tiles_x,
                                           int64_t tiles_y) {
    check_cpu_float(means2d, "means2d");
    check_cpu_float(depths, "depths");
    TORCH_CHECK(radii.scalar_type() == torch::kInt32 && radii.is_contiguous(), "radii must be contiguous int32");
    TORCH_CHECK(image_ids.scalar_type() == torch::kInt32 && image_ids.is_contiguous(),
                "image_ids must be contiguous int32");
    const int64_t M = depths.numel();
    const float *m = means2d.data_ptr<float>();
    const int32_t *r = radii.data_ptr<int32_t>();
    const float *z = depths.data_ptr<float>();
    const int32_t *img = image_ids.data_ptr<int32_t>();
    const int64_t tiles_per_image = tiles_x * tiles_y;
    const int64_t n_tiles = n_images * tiles_per_image;

    // tile rectangle of every entry (as gsplat's IntersectTile: floor/ceil of mean +- radius)
    std::vector<int32_t> rect(4 * M, 0);
    std::vector<int64_t> count(M, 0);
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < M; ++g) {
        if (r[2 * g] <= 0 || r[2 * g + 1] <= 0) continue;
        const float tx = m[2 * g] / tile_size, ty = m[2 * g + 1] / tile_size;
        const float rx = (float)r[2 * g] / tile_size, ry = (float)r[2 * g + 1] / tile_size;
        auto clampi = [](float v, int64_t hi) {
            return (int32_t)std::min<int64_t>(std::max<int64_t>(0, (int64_t)v), hi);
        };
        const int32_t x0 = clampi(std::floor(tx - rx), tiles_x), x1 = clampi(std::ceil(tx + rx), tiles_x);
        const int32_t y0 = clampi(std::floor(ty - ry), tiles_y), y1 = clampi(std::ceil(ty + ry), tiles_y);
        rect[4 * g] = x0;
        rect[4 * g + 1] = y0;
        rect[4 * g + 2] = x1;
        rect[4 * g + 3] = y1;
        count[g] = (int64_t)(x1 - x0) * (y1 - y0);
    }
    auto for_each_tile = [&](int64_t g, auto &&f) {  // global tile index of every tile of entry g
        if (count[g] == 0) return;
        const int64_t base = (int64_t)img[g] * tiles_per_image;
        for (int32_t y = rect[4 * g + 1]; y < rect[4 * g + 3]; ++y)
            for (int32_t x = rect[4 * g]; x < rect[4 * g + 2]; ++x) f(base + y * tiles_x + x);
    };
    std::vector<int64_t> tile_count(n_tiles + 1, 0);
    for (int64_t g = 0; g < M; ++g) for_each_tile(g, [&](int64_t t) { tile_count[t + 1]++; });
    std::partial_sum(tile_count.begin(), tile_count.end(), tile_count.begin());
    const int64_t n_isects = tile_count[n_tiles];
    TORCH_CHECK(n_isects < INT32_MAX, "too many tile intersections: ", n_isects);

    auto offsets = torch::empty({n_tiles + 1}, torch::dtype(torch::kInt32));
    auto ids = torch::empty({n_isects}, torch::dtype(torch::kInt32));
    int32_t *off = offsets.data_ptr<int32_t>();
    int32_t *out = ids.data_ptr<int32_t>();
    for (int64_t t = 0; t <= n_tiles; ++t) off[t] = (int32_t)tile_count[t];
    std::vector<int64_t> fill(tile_count.begin(), tile_count.end() - 1);
    for (int64_t g = 0; g < M; ++g)  // ascending entry order: ties in depth keep index order
        for_each_tile(g, [&](int64_t t) { out[fill[t]++] = (int32_t)g; });
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t t = 0; t < n_tiles; ++t) {
        std::stable_sort(out + off[t], out + off[t + 1], [z](int32_t p, int32_t q) { return z[p] < z[q]; });
    }
    return {offsets, ids};
}

// Channel count as a compile-time constant for the common cases (1, 3, 4), else at run time.
template <class F>
void dispatch_channels(int64_t D, F &&f) {
    switch (D) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        default: f(std::integral_constant<int, 0>{});
    }
}

// Forward. Per-entry inputs may carry leading dimensions ([C, N, ...] dense or [nnz, ...] packed).
// Returns (colors [I,H,W,D], alphas [I,H,W,1], median depth [I,H,W,1], last ids [I,H,W]).
std::vector<torch::Tensor> rasterize_forward(torch::Tensor means2d,      // [M, 2]
                                             torch::Tensor conics,       // [M, 3]
                                             torch::Tensor colors,       // [M, D]
                                             torch::Tensor opacities,    // [M]
                                             torch::Tensor depths,       // [M]
                                             torch::Tensor backgrounds,  // [I, D] or empty
                                             int64_t n_images, int64_t width, int64_t height,
                                             int64_t tile_size, torch::Tensor tile_offsets,
                                             torch::Tensor flatten_ids) {
    const Entries in(means2d, conics, colors, opacities, backgrounds, tile_offsets, flatten_ids);
    check_cpu_float(depths, "depths");
    const float *z = depths.data_ptr<float>();
    const Grid grid(n_images, width, height, tile_size);

    auto out_colors = torch::empty({n_images, height, width, in.D}, torch::dtype(torch::kFloat32));
    auto out_alphas = torch::empty({n_images, height, width, 1}, torch::dtype(torch::kFloat32));
    auto out_median = torch::empty({n_images, height, width, 1}, torch::dtype(torch::kFloat32));
    auto out_last = torch::empty({n_images, height, width}, torch::dtype(torch::kInt32));
    float *oc = out_colors.data_ptr<float>();
    float *oa = out_alphas.data_ptr<float>();
    float *omed = out_median.data_ptr<float>();
    int32_t *olast = out_last.data_ptr<int32_t>();

    dispatch_channels(in.D, [&](auto dt) {
        constexpr int DT = decltype(dt)::value;
        const int64_t D = DT > 0 ? DT : in.D;
#pragma omp parallel
        {
            const int block = (int)(tile_size * tile_size);
            std::vector<float> T_(block), acc_(block * D), med_(block);
            std::vector<int32_t> last_(block);
            std::vector<uint8_t> done_(block);
            float *__restrict__ T = T_.data();
            float *__restrict__ acc = acc_.data();
            float *__restrict__ med = med_.data();
            int32_t *__restrict__ last = last_.data();
            uint8_t *__restrict__ done = done_.data();
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < grid.n_tiles(); ++it) {
                const int64_t image = grid.image_of(it);
                const TileBox box = grid.box(it);
                const int bw = box.x1 - box.x0;
                const int n_pix = bw * (box.y1 - box.y0);
                std::fill(T, T + n_pix, 1.f);
                std::fill(acc, acc + n_pix * D, 0.f);
                std::fill(med, med + n_pix, 0.f);
                std::fill(last, last + n_pix, -1);
                std::fill(done, done + n_pix, 0);
                int n_done = 0;
                for (int32_t idx = in.offsets[it]; idx < in.offsets[it + 1] && n_done < n_pix; ++idx) {
                    const int64_t g = in.ids[idx];
                    const Splat s = in.splat(g);
                    const float *cg = in.colors + g * D;
                    const float zg = z[g];
                    for_each_covered_pixel(s, box, [&](int row, int col) {
                        const int p = (row - box.y0) * bw + (col - box.x0);
                        if (done[p]) return;
                        float sigma, vis, alpha;
                        if (!evaluate(s, (float)col + 0.5f, (float)row + 0.5f, sigma, vis, alpha)) return;
                        const float T_p = T[p];
                        const float next_T = T_p * (1.f - alpha);
                        if (next_T <= kTransmittanceMin) {
                            done[p] = 1;
                            ++n_done;
                            return;
                        }
                        const float w = alpha * T_p;
                        for (int64_t k = 0; k < D; ++k) acc[p * D + k] += cg[k] * w;
                        if (T_p >= kMedianLevel && next_T < kMedianLevel) med[p] = zg;
                        last[p] = idx;
                        T[p] = next_T;
                    });
                }
                for (int row = box.y0; row < box.y1; ++row) {
                    for (int col = box.x0; col < box.x1; ++col) {
                        const int p = (row - box.y0) * bw + (col - box.x0);
                        const int64_t pix = (image * height + row) * width + col;
                        for (int64_t k = 0; k < D; ++k)
                            oc[pix * D + k] =
                                acc[p * D + k] + (in.backgrounds ? T[p] * in.backgrounds[image * D + k] : 0.f);
                        oa[pix] = 1.f - T[p];
                        omed[pix] = med[p];
                        olast[pix] = last[p];
                    }
                }
            }
        }
    });
    return {out_colors, out_alphas, out_median, out_last};
}

constexpr int64_t kMaxBackwardChannels = 32;

// Backward (gsplat's back-to-front recursion, T recovered as T / (1 - alpha)). Gradients are
// written per intersection, then summed per entry in a serial, deterministic pass.
// Returns (v_means2d [M,2], v_conics [M,3], v_colors [M,D], v_opacities [M], v_means2d_abs [M,2]
// (empty unless absgrad)).
std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                              torch::Tensor opacities, torch::Tensor backgrounds,
                                              int64_t n_images, int64_t width, int64_t height, int64_t tile_size,
                                              torch::Tensor tile_offsets, torch::Tensor flatten_ids,
                                              torch::Tensor render_alphas,    // [I,H,W,1]
                                              torch::Tensor last_ids,         // [I,H,W]
                                              torch::Tensor v_render_colors,  // [I,H,W,D]
                                              torch::Tensor v_render_alphas,  // [I,H,W,1]
                                              bool absgrad) {
    const Entries in(means2d, conics, colors, opacities, backgrounds, tile_offsets, flatten_ids);
    check_cpu_float(v_render_colors, "v_render_colors");
    check_cpu_float(v_render_alphas, "v_render_alphas");
    TORCH_CHECK(in.D <= kMaxBackwardChannels, "the CPU rasteriser backward supports at most ",
                kMaxBackwardChannels, " channels, got ", in.D);
    const Grid grid(n_images, width, height, tile_size);
    const int64_t M = opacities.numel();
    const int64_t n_isects = flatten_ids.numel();
    const int64_t stride = 8 + in.D;  // per intersection: xy (2), conic (3), colour (D), opacity, |xy| (2)
    std::vector<float> part(n_isects * stride, 0.f);
    const float *ra = render_alphas.data_ptr<float>();
    const int32_t *rl = last_ids.data_ptr<int32_t>();
    const float *vc = v_render_colors.data_ptr<float>();
    const float *va = v_render_alphas.data_ptr<float>();

    dispatch_channels(in.D, [&](auto dt) {
        constexpr int DT = decltype(dt)::value;
        const int64_t D = DT > 0 ? DT : in.D;
#pragma omp parallel
        {
            const int block = (int)(tile_size * tile_size);
            std::vector<float> T_(block), T_final_(block), buf_(block * D), v_out_(block * D), v_alpha_out_(block);
            std::vector<int32_t> last_(block);
            float *__restrict__ T = T_.data();
            float *__restrict__ T_final = T_final_.data();
            float *__restrict__ buf = buf_.data();
            float *__restrict__ v_out = v_out_.data();
            float *__restrict__ v_alpha_out = v_alpha_out_.data();
            int32_t *__restrict__ last = last_.data();
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < grid.n_tiles(); ++it) {
                const int64_t image = grid.image_of(it);
                const TileBox box = grid.box(it);
                const int bw = box.x1 - box.x0;
                int32_t max_last = -1;
                for (int row = box.y0; row < box.y1; ++row) {
                    for (int col = box.x0; col < box.x1; ++col) {
                        const int p = (row - box.y0) * bw + (col - box.x0);
                        const int64_t pix = (image * height + row) * width + col;
                        T_final[p] = T[p] = 1.f - ra[pix];
                        last[p] = rl[pix];
                        max_last = std::max(max_last, last[p]);
                        float bg_dot = 0.f;
                        for (int64_t k = 0; k < D; ++k) {
                            buf[p * D + k] = 0.f;
                            v_out[p * D + k] = vc[pix * D + k];
                            if (in.backgrounds) bg_dot += in.backgrounds[image * D + k] * vc[pix * D + k];
                        }
                        // d(out)/d(alpha_i) has the term T_final / (1 - alpha_i) * (v_alpha - bg . v_color)
                        v_alpha_out[p] = va[pix] - bg_dot;
                    }
                }
                for (int32_t idx = max_last; idx >= in.offsets[it]; --idx) {
                    const int64_t g = in.ids[idx];
                    const Splat s = in.splat(g);
                    const float *cg = in.colors + g * D;
                    float v_col[DT > 0 ? DT : kMaxBackwardChannels] = {};
                    float gx_sum = 0.f, gy_sum = 0.f, ca = 0.f, cb = 0.f, cc = 0.f, v_op = 0.f, ax = 0.f, ay = 0.f;
                    bool touched = false;
                    for_each_covered_pixel(s, box, [&](int row, int col) {
                        const int p = (row - box.y0) * bw + (col - box.x0);
                        if (idx > last[p]) return;
                        const float px = (float)col + 0.5f, py = (float)row + 0.5f;
                        float sigma, vis, alpha;
                        if (!evaluate(s, px, py, sigma, vis, alpha)) return;
                        touched = true;
                        const float rinv = 1.f / (1.f - alpha);
                        const float T_p = T[p] * rinv;
                        T[p] = T_p;
                        const float w = alpha * T_p;
                        float v_alpha = 0.f;
                        for (int64_t k = 0; k < D; ++k) {
                            const float vo = v_out[p * D + k];
                            v_col[k] += w * vo;
                            v_alpha += (cg[k] * T_p - buf[p * D + k] * rinv) * vo;
                            buf[p * D + k] += cg[k] * w;
                        }
                        v_alpha += T_final[p] * rinv * v_alpha_out[p];
                        if (s.opacity * vis <= kMaxAlpha) {
                            const float v_sigma = -s.opacity * vis * v_alpha;
                            const float dx = s.x - px, dy = s.y - py;
                            const float gx = v_sigma * (s.a * dx + s.b * dy);
                            const float gy = v_sigma * (s.b * dx + s.c * dy);
                            gx_sum += gx;
                            gy_sum += gy;
                            ca += 0.5f * v_sigma * dx * dx;
                            cb += v_sigma * dx * dy;
                            cc += 0.5f * v_sigma * dy * dy;
                            v_op += vis * v_alpha;
                            ax += std::fabs(gx);
                            ay += std::fabs(gy);
                        }
                    });
                    if (!touched) continue;
                    float *q = part.data() + idx * stride;
                    q[0] = gx_sum;
                    q[1] = gy_sum;
                    q[2] = ca;
                    q[3] = cb;
                    q[4] = cc;
                    for (int64_t k = 0; k < D; ++k) q[5 + k] = v_col[k];
                    q[5 + D] = v_op;
                    q[6 + D] = ax;
                    q[7 + D] = ay;
                }
            }
        }
    });
    const int64_t D = in.D;

    auto v_means2d = torch::zeros({M, 2}, torch::dtype(torch::kFloat32));
    auto v_conics = torch::zeros({M, 3}, torch::dtype(torch::kFloat32));
    auto v_colors = torch::zeros({M, D}, torch::dtype(torch::kFloat32));
    auto v_opacities = torch::zeros({M}, torch::dtype(torch::kFloat32));
    auto v_abs = torch::zeros({absgrad ? M : 0, 2}, torch::dtype(torch::kFloat32));
    float *vm = v_means2d.data_ptr<float>();
    float *vcn = v_conics.data_ptr<float>();
    float *vcol = v_colors.data_ptr<float>();
    float *vop = v_opacities.data_ptr<float>();
    float *vab = absgrad ? v_abs.data_ptr<float>() : nullptr;
    for (int64_t idx = 0; idx < n_isects; ++idx) {
        const float *q = part.data() + idx * stride;
        const int64_t g = in.ids[idx];
        vm[2 * g] += q[0];
        vm[2 * g + 1] += q[1];
        for (int k = 0; k < 3; ++k) vcn[3 * g + k] += q[2 + k];
        for (int64_t k = 0; k < D; ++k) vcol[g * D + k] += q[5 + k];
        vop[g] += q[5 + D];
        if (vab) {
            vab[2 * g] += q[6 + D];
            vab[2 * g + 1] += q[7 + D];
        }
    }
    return {v_means2d, v_conics, v_colors, v_opacities, v_abs};
}
