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
// OpenMP (dynamic schedule). Inside a tile the loop runs Gaussian-major; per Gaussian it visits the
// rows of its alpha >= 1/255 ellipse (with a margin) and, in each row, the pixels of the ellipse's
// span in groups of kLanes consecutive pixels evaluated as one SIMD vector. The exact per-pixel
// test decides, so the result equals visiting every pixel of the tile. Per-pixel state is kept in
// structure-of-arrays form with rows padded by kLanes pixels (padding lanes never take a
// contribution), so a group may start at any column.
// The kernels are compiled twice, for the baseline target and for AVX2 + FMA (chosen at run time), and
// exp is a polynomial (within 2 ulp of expf) so both passes vectorise and agree bit for bit.
// Each call first gathers every entry into one record with its footprint constants. The backward
// writes per-intersection gradient sums, then adds them per entry in list order, in parallel over
// entries: the gradients are deterministic and do not depend on the thread count.

#include "splat.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>
#include <utility>
#include <type_traits>
#include <vector>

namespace {

constexpr float kAlphaThreshold = 1.f / 255.f;
constexpr float kMaxAlpha = 0.999f;
constexpr float kTransmittanceMin = 1e-4f;
constexpr float kMedianLevel = 0.5f;
constexpr int kLanes = 8;
constexpr int64_t kMaxBackwardChannels = 32;

// The vector helpers are always inlined, so the vector ABI of the baseline build never matters.
#pragma GCC diagnostic ignored "-Wpsabi"

// kLanes pixels as one SIMD value (GCC vector extensions: one AVX register in the AVX2 build, two
// SSE registers in the baseline build). Comparisons give integer masks (-1 true, 0 false).
typedef float VF __attribute__((vector_size(4 * kLanes)));
typedef int32_t VI __attribute__((vector_size(4 * kLanes)));

LMVIC_INLINE VF bcast(float v) { return VF{} + v; }
LMVIC_INLINE VI bcast(int32_t v) { return VI{} + v; }
LMVIC_INLINE VF load(const float *p) {
    VF v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
LMVIC_INLINE VI load(const int32_t *p) {
    VI v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
LMVIC_INLINE void store(float *p, VF v) { std::memcpy(p, &v, sizeof v); }
LMVIC_INLINE void store(int32_t *p, VI v) { std::memcpy(p, &v, sizeof v); }
LMVIC_INLINE VF select(VI mask, VF a, VF b) { return mask ? a : b; }
LMVIC_INLINE VF vabs(VF v) { return (VF)((VI)v & bcast((int32_t)0x7fffffff)); }
// Lane sums of `count` <= kLanes vectors, written to out[0, count).
LMVIC_INLINE void lane_sums(const VF *v, int count, float *out) {
    static_assert(kLanes == 8, "the shuffle tree assumes 8 lanes");
    VF x[8];
    for (int j = 0; j < 8; ++j) x[j] = j < count ? v[j] : VF{};
    VF a[4], b[2];
    for (int k = 0; k < 4; ++k)  // lanes: pair sums of x[2k] and x[2k+1], interleaved
        a[k] = __builtin_shufflevector(x[2 * k], x[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(x[2 * k], x[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int k = 0; k < 2; ++k)  // lanes: quarter sums of x[4k..4k+3] (lower and upper half)
        b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(a[2 * k], a[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    const VF total = __builtin_shufflevector(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                     __builtin_shufflevector(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int j = 0; j < count; ++j) out[j] = total[j];
}

// exp(x) for x in [-32, 88] (clamped below; callers mask the lanes with x > 0), Cephes' expf
// polynomial: relative error < 1.5e-7. The low clamp keeps alpha and the products formed from it away from subnormal floats (which
// cost a micro-code assist per instruction); it changes nothing, since exp(-32) * opacity is far
// below the 1/255 alpha threshold.
LMVIC_INLINE VF exp_poly(VF x) {
    x = select(x > -32.f, x, bcast(-32.f));
    const VI n = __builtin_convertvector(x * 1.44269504088896341f + select(x < 0.f, bcast(-0.5f), bcast(0.5f)), VI);
    const VF fn = __builtin_convertvector(n, VF);
    const VF r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
    VF p = bcast(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (p * r * r + r + 1.f) * (VF)((n + 127) << 23);
}

// One entry as the compositor reads it, gathered once per call (one record per entry instead of
// scattered loads from five arrays per intersection), with the constants of its footprint.
struct Splat {
    float x, y;     // 2-D mean (pixels)
    float a, b, c;  // conic: sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy
    float opacity;
    float z;        // camera depth (median depth)
    // Footprint: the alpha >= 1/255 ellipse sigma <= smax, with smax the largest sigma at which alpha
    // reaches the threshold plus a margin (about 0.1 % of the radius) for float rounding, so the rows
    // and spans below are a superset of the pixels the exact test accepts.
    float det;         // a c - b^2; 0 when degenerate: every pixel of the tile
    float two_a_smax;  // 2 a smax
    float inv_a;       // 1 / a
    float half_h;      // largest |dy| on the ellipse; < 0 when alpha never reaches the threshold
    float pad;
};

Splat make_splat(const float *means2d, const float *conics, const float *opacities, const float *z, int64_t g) {
    Splat s{means2d[2 * g], means2d[2 * g + 1], conics[3 * g], conics[3 * g + 1], conics[3 * g + 2],
            opacities[g], z ? z[g] : 0.f, 0.f, 0.f, 0.f, -1.f, 0.f};
    if (!(s.opacity >= kAlphaThreshold)) return s;
    const float l = std::log(s.opacity / kAlphaThreshold);
    const float smax = l + 1e-2f + 1e-3f * l;
    s.det = s.a * s.c - s.b * s.b;
    s.half_h = 0.f;
    if (!(s.det > 0.f) || !(s.a > 0.f)) {
        s.det = 0.f;
        return s;
    }
    s.two_a_smax = 2.f * s.a * smax;
    s.inv_a = 1.f / s.a;
    s.half_h = std::sqrt(s.two_a_smax / s.det);
    return s;
}

// exp(-sigma) and alpha of a splat at offsets (dx, dy) = mean - pixel centre, and the mask of
// pixels that take the contribution (sigma >= 0, alpha >= 1/255); the one definition used by
// forward and backward, so both make the same decisions.
LMVIC_INLINE VI evaluate(const Splat &s, VF dx, float dy, VF &vis, VF &alpha) {
    const VF sigma = 0.5f * (s.a * dx * dx + s.c * dy * dy) + s.b * dx * dy;
    vis = exp_poly(-sigma);
    alpha = s.opacity * vis;
    alpha = select(alpha < kMaxAlpha, alpha, bcast(kMaxAlpha));
    return (sigma >= 0.f) & (alpha >= kAlphaThreshold);
}

// Offsets mean - pixel centre of the kLanes pixels from column `col0` on.
LMVIC_INLINE VF lane_dx(const Splat &s, int col0) {
    VF lanes;
    for (int l = 0; l < kLanes; ++l) lanes[l] = (float)l;
    return s.x - ((float)col0 + 0.5f + lanes);
}

struct TileBox {
    int x0, y0, x1, y1;  // pixel block of the tile, [x0, x1) x [y0, y1)
};

// Rows [r0, r1) of the tile that the splat's footprint meets.
LMVIC_INLINE bool footprint_rows(const Splat &s, const TileBox &t, int &r0, int &r1) {
    if (s.half_h < 0.f) return false;
    if (s.det == 0.f) {
        r0 = t.y0;
        r1 = t.y1;
        return true;
    }
    r0 = std::max(t.y0, (int)std::ceil(s.y - s.half_h - 0.5f));  // pixel centres row + 0.5
    r1 = std::min(t.y1, (int)std::floor(s.y + s.half_h - 0.5f) + 1);
    return r0 < r1;
}

// Columns [c0, c1) of tile row `row` inside the footprint.
LMVIC_INLINE bool row_span(const Splat &s, const TileBox &t, int row, int &c0, int &c1) {
    if (s.det == 0.f) {
        c0 = t.x0;
        c1 = t.x1;
        return true;
    }
    const float dy = s.y - ((float)row + 0.5f);
    // sigma(dx, dy) = smax: a dx^2 + 2 b dy dx + c dy^2 - 2 smax = 0, discriminant / 4 = 2 a smax - det dy^2
    const float disc = s.two_a_smax - s.det * dy * dy;
    if (disc < 0.f) return false;
    const float root = std::sqrt(disc), bdy = s.b * dy;
    // dx = x_mean - px in [(-bdy - root) / a, (-bdy + root) / a]
    c0 = std::max(t.x0, (int)std::ceil(s.x + (bdy - root) * s.inv_a - 0.5f));
    c1 = std::min(t.x1, (int)std::floor(s.x + (bdy + root) * s.inv_a - 0.5f) + 1);
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
    int stride;  // row length of the per-pixel state: a lane group may start at any column

    Grid(int64_t n, int64_t w, int64_t h, int64_t ts)
        : n_images(n), width(w), height(h), tile_size(ts), tiles_x((w + ts - 1) / ts), tiles_y((h + ts - 1) / ts),
          stride((int)ts + kLanes) {}
    int64_t tiles_per_image() const { return tiles_x * tiles_y; }
    int64_t n_tiles() const { return n_images * tiles_per_image(); }
    int64_t image_of(int64_t tile) const { return tile / tiles_per_image(); }
    int64_t padded_pixels() const { return tile_size * stride; }
    TileBox box(int64_t tile) const {
        const int64_t t = tile % tiles_per_image();
        const int tx = (int)(t % tiles_x), ty = (int)(t / tiles_x), ts = (int)tile_size;
        return TileBox{tx * ts, ty * ts, std::min((int)width, (tx + 1) * ts), std::min((int)height, (ty + 1) * ts)};
    }
    // Index of pixel (row, col) of the tile in the padded per-pixel state.
    int slot(const TileBox &b, int row, int col) const { return (row - b.y0) * stride + (col - b.x0); }
    int64_t pixel(int64_t image, int row, int col) const { return (image * height + row) * width + col; }
};

// Calls f(p0, dx, dy) for every lane group of the splat's footprint rows [r0, r1) in the tile: p0
// the slot of the group's first pixel, dx its lanes' offsets mean - pixel centre, dy the row's.
// Both passes visit the same groups. f must be always_inline (it runs in the caller's build).
template <class F>
LMVIC_INLINE void for_each_group(const Splat &s, const Grid &grid, const TileBox &box, int r0, int r1, F &&f) {
    for (int row = r0; row < r1; ++row) {
        int c0, c1;
        if (!row_span(s, box, row, c0, c1)) continue;
        const float dy = s.y - ((float)row + 0.5f);
        for (int col0 = c0; col0 < c1; col0 += kLanes) f(grid.slot(box, row, col0), lane_dx(s, col0), dy);
    }
}

// Read-only per-entry inputs of the compositor and the tile lists.
struct Entries {
    const Splat *splats;                // [M]
    const float *colors, *backgrounds;  // [M, D]; [I, D] or null
    int64_t M, D;
    const int32_t *offsets, *ids;
};

// Checks the inputs and gathers the entries' splat records, in parallel, into a buffer the calling
// thread reuses on later calls. `depths` may be undefined (no median depth).
Entries gather_entries(const torch::Tensor &means2d, const torch::Tensor &conics, const torch::Tensor &colors,
                       const torch::Tensor &opacities, const torch::Tensor &depths, const torch::Tensor &backgrounds,
                       const torch::Tensor &offsets, const torch::Tensor &ids) {
    check_cpu_float(means2d, "means2d");
    check_cpu_float(conics, "conics");
    check_cpu_float(colors, "colors");
    check_cpu_float(opacities, "opacities");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt32 && ids.scalar_type() == torch::kInt32,
                "tile offsets and ids must be int32");
    thread_local std::vector<Splat> splats;
    const int64_t M = opacities.numel();
    splats.resize(M);
    const float *m = means2d.data_ptr<float>(), *cn = conics.data_ptr<float>(), *o = opacities.data_ptr<float>();
    const float *z = nullptr;
    if (depths.defined()) {
        check_cpu_float(depths, "depths");
        z = depths.data_ptr<float>();
    }
    Splat *out = splats.data();
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < M; ++g) out[g] = make_splat(m, cn, o, z, g);
    const float *bg = nullptr;
    if (backgrounds.numel() > 0) {
        check_cpu_float(backgrounds, "backgrounds");
        bg = backgrounds.data_ptr<float>();
    }
    return Entries{out, colors.data_ptr<float>(), bg, M, colors.size(-1), offsets.data_ptr<int32_t>(),
                   ids.data_ptr<int32_t>()};
}

// Per-thread per-pixel state of one tile (padded layout; `plane` holds D channel-major planes). Both
// passes start a tile from T = 1, zero channel sums and no last entry (padding pixels keep -1).
struct TileState {
    std::vector<float> T, plane;
    std::vector<int32_t> last;
    TileState(int64_t n, int64_t D) : T(n), plane(n * D), last(n) {}
};

// Tile `it` as both passes see it: its pixel block and image, and its per-pixel state, reset.
struct Tile {
    TileBox box;
    int64_t image, n;  // n: padded pixel count
    float *__restrict__ T;
    float *__restrict__ plane;
    int32_t *__restrict__ last;

    Tile(const Grid &grid, int64_t it, TileState &st)
        : box(grid.box(it)), image(grid.image_of(it)), n(grid.padded_pixels()), T(st.T.data()),
          plane(st.plane.data()), last(st.last.data()) {
        std::fill(st.T.begin(), st.T.end(), 1.f);
        std::fill(st.plane.begin(), st.plane.end(), 0.f);
        std::fill(st.last.begin(), st.last.end(), -1);
    }
};

// The forward pass adds the median depth and the pixels that stopped (-1; padding too).
struct ForwardScratch : TileState {
    std::vector<float> med;
    std::vector<int32_t> done;
    ForwardScratch(int64_t n, int64_t D) : TileState(n, D), med(n), done(n) {}
};

// Composites tile `it` front to back and writes its pixels of the outputs.
template <int DT>
LMVIC_INLINE void forward_tile_impl(const Entries &in, const Grid &grid, int64_t it, ForwardScratch &sc, float *oc,
                                    float *oa, float *omed, int32_t *olast) {
    const int64_t D = DT > 0 ? DT : in.D;
    const Tile tile(grid, it, sc);
    const TileBox box = tile.box;
    const int64_t n = tile.n, image = tile.image;
    float *__restrict__ T = tile.T, *__restrict__ acc = tile.plane, *__restrict__ med = sc.med.data();
    int32_t *__restrict__ last = tile.last, *__restrict__ done = sc.done.data();
    std::fill(med, med + n, 0.f);
    for (int row = 0; row < (int)grid.tile_size; ++row)  // padding never takes a contribution
        for (int col = 0; col < grid.stride; ++col)
            done[row * grid.stride + col] = (box.y0 + row >= box.y1 || box.x0 + col >= box.x1) ? -1 : 0;
    const int n_pix = (box.x1 - box.x0) * (box.y1 - box.y0);
    int n_done = 0;
    for (int32_t idx = in.offsets[it]; idx < in.offsets[it + 1] && n_done < n_pix; ++idx) {
        const int64_t g = in.ids[idx];
        const Splat s = in.splats[g];
        int r0, r1;
        if (!footprint_rows(s, box, r0, r1)) continue;
        const float *cg = in.colors + g * D;
        const VF zg = bcast(s.z);
        const VI vidx = bcast(idx);
        VI stops = {};  // -1 per pixel that stops at this splat
        for_each_group(s, grid, box, r0, r1, [&](int p0, VF dx, float dy) __attribute__((always_inline)) {
            VF vis, alpha;
            const VI done0 = load(done + p0);
            const VI hit = evaluate(s, dx, dy, vis, alpha) & ~done0;
            const VF t = load(T + p0);
            const VF next_t = t * (1.f - alpha);
            const VI stop = hit & (next_t <= kTransmittanceMin);
            const VI use = hit & ~stop;
            const VF w = select(use, alpha * t, VF{});
            store(med + p0, select(use & (t >= kMedianLevel) & (next_t < kMedianLevel), zg, load(med + p0)));
            store(last + p0, use ? vidx : load(last + p0));
            store(T + p0, select(use, next_t, t));
            store(done + p0, done0 | stop);
            stops += stop;
            for (int64_t ch = 0; ch < D; ++ch) store(acc + ch * n + p0, load(acc + ch * n + p0) + cg[ch] * w);
        });
        for (int l = 0; l < kLanes; ++l) n_done -= stops[l];
    }
    for (int row = box.y0; row < box.y1; ++row) {
        for (int col = box.x0; col < box.x1; ++col) {
            const int p = grid.slot(box, row, col);
            const int64_t pix = grid.pixel(image, row, col);
            for (int64_t ch = 0; ch < D; ++ch)
                oc[pix * D + ch] = acc[ch * n + p] + (in.backgrounds ? T[p] * in.backgrounds[image * D + ch] : 0.f);
            oa[pix] = 1.f - T[p];
            omed[pix] = med[p];
            olast[pix] = last[p];
        }
    }
}

// The backward pass adds the final transmittance, the output gradients and the colour sums behind.
struct BackwardScratch : TileState {
    std::vector<float> v_out, v_alpha_final;
    BackwardScratch(int64_t n, int64_t D) : TileState(n, D), v_out(n * D), v_alpha_final(n) {}
};

// Gradient sums per intersection: xy (2), conic (3), opacity, |xy| (2), then colour (D).
constexpr int kPartFixed = 8;

struct BackwardInputs {
    const float *render_alphas, *v_colors, *v_alphas;
    const int32_t *last_ids;
    float *part;  // [n_isects, kPartFixed + D]
};

// gsplat's back-to-front recursion over tile `it` (T recovered as T / (1 - alpha)); writes the
// gradient sums of every intersection of the tile into its own slot of `part` (zeros where none);
// the |xy| sums only with ABS.
template <int DT, bool ABS>
LMVIC_INLINE void backward_tile_impl(const Entries &in, const Grid &grid, int64_t it, const BackwardInputs &bi,
                                     BackwardScratch &sc) {
    const int64_t D = DT > 0 ? DT : in.D;
    const Tile tile(grid, it, sc);
    const TileBox box = tile.box;
    const int64_t n = tile.n, image = tile.image;
    float *__restrict__ T = tile.T, *__restrict__ buf = tile.plane, *__restrict__ v_out = sc.v_out.data();
    float *__restrict__ v_alpha_final = sc.v_alpha_final.data();
    int32_t *__restrict__ last = tile.last;
    std::fill(v_out, v_out + n * D, 0.f);
    std::fill(v_alpha_final, v_alpha_final + n, 0.f);
    int32_t max_last = -1;
    for (int row = box.y0; row < box.y1; ++row) {
        for (int col = box.x0; col < box.x1; ++col) {
            const int p = grid.slot(box, row, col);
            const int64_t pix = grid.pixel(image, row, col);
            T[p] = 1.f - bi.render_alphas[pix];
            last[p] = bi.last_ids[pix];
            max_last = std::max(max_last, last[p]);
            float bg_dot = 0.f;
            for (int64_t ch = 0; ch < D; ++ch) {
                v_out[ch * n + p] = bi.v_colors[pix * D + ch];
                if (in.backgrounds) bg_dot += in.backgrounds[image * D + ch] * bi.v_colors[pix * D + ch];
            }
            // d(out)/d(alpha_i) has the term T_final / (1 - alpha_i) * (v_alpha - bg . v_color)
            v_alpha_final[p] = T[p] * (bi.v_alphas[pix] - bg_dot);
        }
    }
    const int64_t stride = kPartFixed + D;
    const int32_t begin = in.offsets[it], end = in.offsets[it + 1];
    std::fill(bi.part + (int64_t)std::max(max_last + 1, begin) * stride, bi.part + (int64_t)end * stride, 0.f);
    for (int32_t idx = max_last; idx >= begin; --idx) {
        const int64_t g = in.ids[idx];
        const Splat s = in.splats[g];
        float *q = bi.part + idx * stride;
        int r0, r1;
        if (!footprint_rows(s, box, r0, r1)) {
            std::fill(q, q + stride, 0.f);
            continue;
        }
        const float *cg = in.colors + g * D;
        const VI vidx = bcast(idx);
        // per-lane sums: gx, gy, conic a, b, c, opacity, |gx|, |gy|, then the colour channels
        VF sums[kPartFixed + (DT > 0 ? DT : kMaxBackwardChannels)] = {};
        for_each_group(s, grid, box, r0, r1, [&](int p0, VF dx, float dy) __attribute__((always_inline)) {
            VF vis, alpha;
            const VI valid = evaluate(s, dx, dy, vis, alpha) & (vidx <= load(last + p0));
            const VF rinv = 1.f / (1.f - alpha);
            const VF t = select(valid, load(T + p0) * rinv, load(T + p0));  // in front of this splat
            store(T + p0, t);
            const VF w = select(valid, alpha * t, VF{});
            VF v_alpha = load(v_alpha_final + p0) * rinv;
            for (int64_t ch = 0; ch < D; ++ch) {
                const VF b = load(buf + ch * n + p0), vo = load(v_out + ch * n + p0);
                v_alpha += (cg[ch] * t - b * rinv) * vo;
                sums[kPartFixed + ch] += w * vo;
                store(buf + ch * n + p0, b + cg[ch] * w);
            }
            const VI grad = valid & (s.opacity * vis <= kMaxAlpha);
            const VF v_sigma = select(grad, -s.opacity * vis * v_alpha, VF{});
            const VF gx = v_sigma * (s.a * dx + s.b * dy);
            const VF gy = v_sigma * (s.b * dx + s.c * dy);
            sums[0] += gx;
            sums[1] += gy;
            sums[2] += 0.5f * v_sigma * dx * dx;
            sums[3] += v_sigma * dx * dy;
            sums[4] += 0.5f * v_sigma * dy * dy;
            sums[5] += select(grad, vis * v_alpha, VF{});
            if (ABS) {
                sums[6] += vabs(gx);
                sums[7] += vabs(gy);
            }
        });
        for (int64_t j = 0; j < stride; j += kLanes) lane_sums(sums + j, (int)std::min<int64_t>(kLanes, stride - j), q + j);
    }
}

// The kernels for the baseline target and for AVX2 + FMA.
template <int DT>
void forward_tile_base(const Entries &in, const Grid &grid, int64_t it, ForwardScratch &sc, float *oc, float *oa,
                       float *omed, int32_t *olast) {
    forward_tile_impl<DT>(in, grid, it, sc, oc, oa, omed, olast);
}

template <int DT>
LMVIC_AVX2 void forward_tile_avx2(const Entries &in, const Grid &grid, int64_t it, ForwardScratch &sc, float *oc,
                                  float *oa, float *omed, int32_t *olast) {
    forward_tile_impl<DT>(in, grid, it, sc, oc, oa, omed, olast);
}

template <int DT, bool ABS>
void backward_tile_base(const Entries &in, const Grid &grid, int64_t it, const BackwardInputs &bi,
                        BackwardScratch &sc) {
    backward_tile_impl<DT, ABS>(in, grid, it, bi, sc);
}

template <int DT, bool ABS>
LMVIC_AVX2 void backward_tile_avx2(const Entries &in, const Grid &grid, int64_t it, const BackwardInputs &bi,
                                   BackwardScratch &sc) {
    backward_tile_impl<DT, ABS>(in, grid, it, bi, sc);
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

// Sums the per-intersection gradient parts of every entry (columns of `part` as in the backward's
// outputs), in parallel over entries. Each entry adds its intersections in list order, as one
// serial pass over the list would, so the sums do not depend on the thread count.
void reduce_parts(const float *part, int64_t stride, const int32_t *ids, int64_t n_isects, int64_t M, int64_t D,
                  float *vm, float *vcn, float *vcol, float *vop, float *vab) {
    thread_local std::vector<int32_t> start, next, order;  // intersections of every entry (CSR)
    start.assign(M + 1, 0);
    for (int64_t i = 0; i < n_isects; ++i) start[ids[i] + 1]++;
    for (int64_t g = 0; g < M; ++g) start[g + 1] += start[g];
    next.assign(start.begin(), start.end() - 1);
    order.resize(n_isects);
    for (int64_t i = 0; i < n_isects; ++i) order[next[ids[i]]++] = (int32_t)i;
    const int32_t *first = start.data(), *isect = order.data();  // this thread's buffers, for all threads
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < M; ++g) {
        float acc[kPartFixed + kMaxBackwardChannels] = {};
        for (int32_t k = first[g]; k < first[g + 1]; ++k) {
            const float *q = part + isect[k] * stride;
            for (int64_t j = 0; j < stride; ++j) acc[j] += q[j];
        }
        vm[2 * g] = acc[0];
        vm[2 * g + 1] = acc[1];
        for (int k = 0; k < 3; ++k) vcn[3 * g + k] = acc[2 + k];
        vop[g] = acc[5];
        if (vab) {
            vab[2 * g] = acc[6];
            vab[2 * g + 1] = acc[7];
        }
        for (int64_t k = 0; k < D; ++k) vcol[g * D + k] = acc[kPartFixed + k];
    }
}

}  // namespace

// Tile lists: for every (image, tile) the entries whose radius box touches it, sorted by depth
// (ties in entry order). A counting sort by tile, parallel over contiguous ranges of entries (each
// thread's range keeps its place, so the result does not depend on the thread count), then a
// sort by (depth, entry) within every tile.
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
    auto for_each_tile = [&](int64_t g, auto &&f) {  // global tile index of every tile of entry g
        const int64_t base = (int64_t)img[g] * tiles_per_image;
        for (int32_t y = rect[4 * g + 1]; y < rect[4 * g + 3]; ++y)
            for (int32_t x = rect[4 * g]; x < rect[4 * g + 2]; ++x) f(base + y * tiles_x + x);
    };
    const int n_threads = std::max(1, std::min<int>(omp_get_max_threads(), (int)(M / 4096) + 1));
    // count[k * n_tiles + t]: entries of range k in tile t, turned into the range's write positions
    std::vector<int64_t> count((int64_t)n_threads * n_tiles, 0);
    auto range = [&](int k) { return std::make_pair(M * k / n_threads, M * (k + 1) / n_threads); };
#pragma omp parallel num_threads(n_threads)
    {
        const int k = omp_get_thread_num();
        const auto [lo, hi] = range(k);
        int64_t *cnt = count.data() + (int64_t)k * n_tiles;
        for (int64_t g = lo; g < hi; ++g) {
            if (r[2 * g] <= 0 || r[2 * g + 1] <= 0) continue;
            const float tx = m[2 * g] / tile_size, ty = m[2 * g + 1] / tile_size;
            const float rx = (float)r[2 * g] / tile_size, ry = (float)r[2 * g + 1] / tile_size;
            auto clampi = [](float v, int64_t top) {
                return (int32_t)std::min<int64_t>(std::max<int64_t>(0, (int64_t)v), top);
            };
            rect[4 * g] = clampi(std::floor(tx - rx), tiles_x);
            rect[4 * g + 1] = clampi(std::floor(ty - ry), tiles_y);
            rect[4 * g + 2] = clampi(std::ceil(tx + rx), tiles_x);
            rect[4 * g + 3] = clampi(std::ceil(ty + ry), tiles_y);
            for_each_tile(g, [&](int64_t t) { cnt[t]++; });
        }
    }
    auto offsets = torch::empty({n_tiles + 1}, torch::dtype(torch::kInt32));
    int32_t *off = offsets.data_ptr<int32_t>();
    int64_t total = 0;
    for (int64_t t = 0; t < n_tiles; ++t) {
        off[t] = (int32_t)total;
        for (int k = 0; k < n_threads; ++k) {
            const int64_t c = count[(int64_t)k * n_tiles + t];
            count[(int64_t)k * n_tiles + t] = total;
            total += c;
        }
        TORCH_CHECK(total < INT32_MAX, "too many tile intersections: ", total);
    }
    off[n_tiles] = (int32_t)total;
    auto ids = torch::empty({total}, torch::dtype(torch::kInt32));
    int32_t *out = ids.data_ptr<int32_t>();
#pragma omp parallel num_threads(n_threads)
    {
        const int k = omp_get_thread_num();
        const auto [lo, hi] = range(k);
        int64_t *pos = count.data() + (int64_t)k * n_tiles;
        for (int64_t g = lo; g < hi; ++g) for_each_tile(g, [&](int64_t t) { out[pos[t]++] = (int32_t)g; });
    }
#pragma omp parallel
    {
        std::vector<uint64_t> keys;  // (depth, entry) as one integer: depth bits made order-preserving
#pragma omp for schedule(dynamic, 8)
        for (int64_t t = 0; t < n_tiles; ++t) {
            keys.clear();
            for (int32_t i = off[t]; i < off[t + 1]; ++i) {
                uint32_t bits;
                const float depth = z[out[i]] + 0.f;  // -0 -> +0
                std::memcpy(&bits, &depth, sizeof bits);
                bits ^= (uint32_t)((int32_t)bits >> 31) | 0x80000000u;  // negatives reversed, below positives
                keys.push_back((uint64_t)bits << 32 | (uint32_t)out[i]);
            }
            std::sort(keys.begin(), keys.end());  // by depth, then entry
            for (int32_t i = off[t]; i < off[t + 1]; ++i) out[i] = (int32_t)(keys[i - off[t]] & 0xffffffffu);
        }
    }
    return {offsets, ids};
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
    const Entries in = gather_entries(means2d, conics, colors, opacities, depths, backgrounds, tile_offsets,
                                      flatten_ids);
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
        auto *tile = has_avx2() ? &forward_tile_avx2<DT> : &forward_tile_base<DT>;
#pragma omp parallel
        {
            ForwardScratch sc(grid.padded_pixels(), in.D);
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < grid.n_tiles(); ++it) tile(in, grid, it, sc, oc, oa, omed, olast);
        }
    });
    return {out_colors, out_alphas, out_median, out_last};
}

// Backward. Gradients are written per intersection, then summed per entry in a deterministic
// pass (parallel over entries). Returns (v_means2d [M,2], v_conics [M,3],
// v_colors [M,D], v_opacities [M], v_means2d_abs [M,2] (empty unless absgrad)).
std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                              torch::Tensor opacities, torch::Tensor backgrounds,
                                              int64_t n_images, int64_t width, int64_t height, int64_t tile_size,
                                              torch::Tensor tile_offsets, torch::Tensor flatten_ids,
                                              torch::Tensor render_alphas,    // [I,H,W,1]
                                              torch::Tensor last_ids,         // [I,H,W]
                                              torch::Tensor v_render_colors,  // [I,H,W,D]
                                              torch::Tensor v_render_alphas,  // [I,H,W,1]
                                              bool absgrad) {
    const Entries in = gather_entries(means2d, conics, colors, opacities, torch::Tensor(), backgrounds,
                                      tile_offsets, flatten_ids);
    check_cpu_float(render_alphas, "render_alphas");
    check_cpu_float(v_render_colors, "v_render_colors");
    check_cpu_float(v_render_alphas, "v_render_alphas");
    TORCH_CHECK(last_ids.scalar_type() == torch::kInt32 && last_ids.is_contiguous(), "last_ids must be int32");
    TORCH_CHECK(in.D <= kMaxBackwardChannels, "the CPU rasteriser backward supports at most ",
                kMaxBackwardChannels, " channels, got ", in.D);
    const Grid grid(n_images, width, height, tile_size);
    const int64_t M = opacities.numel();
    const int64_t D = in.D;
    const int64_t n_isects = flatten_ids.numel();
    const int64_t stride = kPartFixed + D;
    thread_local std::vector<float> part;  // reused by later calls: every slot is written
    part.resize(n_isects * stride);
    const BackwardInputs bi{render_alphas.data_ptr<float>(), v_render_colors.data_ptr<float>(),
                            v_render_alphas.data_ptr<float>(), last_ids.data_ptr<int32_t>(), part.data()};

    dispatch_channels(D, [&](auto dt) {
        constexpr int DT = decltype(dt)::value;
        auto *tile = absgrad ? (has_avx2() ? &backward_tile_avx2<DT, true> : &backward_tile_base<DT, true>)
                             : (has_avx2() ? &backward_tile_avx2<DT, false> : &backward_tile_base<DT, false>);
#pragma omp parallel
        {
            BackwardScratch sc(grid.padded_pixels(), D);
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < grid.n_tiles(); ++it) tile(in, grid, it, bi, sc);
        }
    });

    auto f32 = torch::dtype(torch::kFloat32);
    auto v_means2d = torch::empty({M, 2}, f32);
    auto v_conics = torch::empty({M, 3}, f32);
    auto v_colors = torch::empty({M, D}, f32);
    auto v_opacities = torch::empty({M}, f32);
    auto v_abs = torch::empty({absgrad ? M : 0, 2}, f32);
    reduce_parts(part.data(), stride, in.ids, n_isects, M, D, v_means2d.data_ptr<float>(), v_conics.data_ptr<float>(),
                 v_colors.data_ptr<float>(), v_opacities.data_ptr<float>(),
                 absgrad ? v_abs.data_ptr<float>() : nullptr);
    return {v_means2d, v_conics, v_colors, v_opacities, v_abs};
}
