// EWA projection of 3-D Gaussians with their opacities and spherical-harmonics colours, forward and
// hand-written backward in one pass each, OpenMP over Gaussians (each thread owns a Gaussian
// across all cameras: no races, and every gradient is written once, without zero-filling). The
// per-Gaussian bodies are built for the baseline target and for AVX2 + FMA (chosen at run time).
//
// The same function as gsplat's fused CUDA projection (ProjectionEWA3DGSFused.cu, pinhole) and
// SphericalHarmonicsCUDA.cu: OpenCV world-to-camera viewmats, Jacobian at the mean clamped to 1.3x
// the field of view, eps2d blur (optional antialiasing compensation), opacity-aware radii, culling
// outside [near, far], det <= 0, opacity below 1/255 and off-screen. Results are dense [C, N] or
// packed (visible pairs only, with their camera and Gaussian ids).

#include "splat.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace {

constexpr float kAlphaThreshold = 1.f / 255.f;

using Mat3 = std::array<std::array<float, 3>, 3>;

LMVIC_INLINE Mat3 matmul(const Mat3 &a, const Mat3 &b) {
    Mat3 r{};
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j];
    return r;
}

LMVIC_INLINE Mat3 transpose(const Mat3 &a) {
    Mat3 r{};
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) r[i][j] = a[j][i];
    return r;
}

// Rotation of the normalised quaternion (w, x, y, z).
LMVIC_INLINE Mat3 quat_to_rot(float w, float x, float y, float z) {
    return Mat3{{{1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)},
                 {2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)},
                 {2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)}}};
}

// Everything the projection of one Gaussian into one camera computes (reused by the backward).
struct Projected {
    bool valid;
    float px, py, pz;     // camera-space mean
    Mat3 cov_c;           // camera-space covariance
    float J[2][3];        // Jacobian (with the field-of-view clamp)
    bool clamp_x, clamp_y;
    float tx, ty;         // camera-space x, y after the clamp
    float a, b, c;        // blurred 2-D covariance
    float det, det_orig;  // of the blurred and the unblurred 2-D covariance
    float mx, my;         // 2-D mean
};

struct Camera {
    Mat3 R;
    float t[3];
    float fx, fy, cx, cy;
    float centre[3];  // -R^T t
};

LMVIC_INLINE Camera camera(const float *viewmat, const float *K) {
    Camera cam;
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) cam.R[i][j] = viewmat[4 * i + j];
        cam.t[i] = viewmat[4 * i + 3];
    }
    cam.fx = K[0];
    cam.fy = K[4];
    cam.cx = K[2];
    cam.cy = K[5];
    for (int j = 0; j < 3; ++j) cam.centre[j] = -(cam.R[0][j] * cam.t[0] + cam.R[1][j] * cam.t[1] + cam.R[2][j] * cam.t[2]);
    return cam;
}

// Normalised quaternion, rotation, M = R S and the world covariance M M^T of Gaussian g.
struct Shape {
    float qn[4], qnorm;
    Mat3 R, M, cov;
};

LMVIC_INLINE Shape shape(const float *q, const float *s) {
    Shape sh;
    sh.qnorm = std::sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    const float inv = 1.f / std::max(sh.qnorm, 1e-12f);
    for (int i = 0; i < 4; ++i) sh.qn[i] = q[i] * inv;
    sh.R = quat_to_rot(sh.qn[0], sh.qn[1], sh.qn[2], sh.qn[3]);
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) sh.M[i][j] = sh.R[i][j] * s[j];
    sh.cov = matmul(sh.M, transpose(sh.M));
    return sh;
}

LMVIC_INLINE Projected project(const Shape &sh, const float *mean, const Camera &cam, int width, int height, float eps2d,
                  float near_plane, float far_plane) {
    Projected p{};
    p.px = cam.R[0][0] * mean[0] + cam.R[0][1] * mean[1] + cam.R[0][2] * mean[2] + cam.t[0];
    p.py = cam.R[1][0] * mean[0] + cam.R[1][1] * mean[1] + cam.R[1][2] * mean[2] + cam.t[1];
    p.pz = cam.R[2][0] * mean[0] + cam.R[2][1] * mean[1] + cam.R[2][2] * mean[2] + cam.t[2];
    if (p.pz < near_plane || p.pz > far_plane) return p;
    p.cov_c = matmul(matmul(cam.R, sh.cov), transpose(cam.R));
    const float tan_x = 0.5f * width / cam.fx, tan_y = 0.5f * height / cam.fy;
    const float lim_xp = (width - cam.cx) / cam.fx + 0.3f * tan_x, lim_xn = cam.cx / cam.fx + 0.3f * tan_x;
    const float lim_yp = (height - cam.cy) / cam.fy + 0.3f * tan_y, lim_yn = cam.cy / cam.fy + 0.3f * tan_y;
    const float rz = 1.f / p.pz, rz2 = rz * rz;
    const float u = p.px * rz, v = p.py * rz;
    p.clamp_x = !(u <= lim_xp && u >= -lim_xn);
    p.clamp_y = !(v <= lim_yp && v >= -lim_yn);
    p.tx = p.pz * std::min(lim_xp, std::max(-lim_xn, u));
    p.ty = p.pz * std::min(lim_yp, std::max(-lim_yn, v));
    p.J[0][0] = cam.fx * rz;
    p.J[0][1] = 0.f;
    p.J[0][2] = -cam.fx * p.tx * rz2;
    p.J[1][0] = 0.f;
    p.J[1][1] = cam.fy * rz;
    p.J[1][2] = -cam.fy * p.ty * rz2;
    float JS[2][3];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 3; ++j)
            JS[i][j] = p.J[i][0] * p.cov_c[0][j] + p.J[i][1] * p.cov_c[1][j] + p.J[i][2] * p.cov_c[2][j];
    float cov2[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) cov2[i][j] = JS[i][0] * p.J[j][0] + JS[i][1] * p.J[j][1] + JS[i][2] * p.J[j][2];
    p.a = cov2[0][0];
    p.b = 0.5f * (cov2[0][1] + cov2[1][0]);
    p.c = cov2[1][1];
    p.det_orig = p.a * p.c - p.b * p.b;
    p.a += eps2d;
    p.c += eps2d;
    p.det = p.a * p.c - p.b * p.b;
    p.mx = cam.fx * p.px * rz + cam.cx;
    p.my = cam.fy * p.py * rz + cam.cy;
    p.valid = p.det > 0.f;
    return p;
}

void check_float(const torch::Tensor &t, const char *name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
                " must be a contiguous float32 CPU tensor");
}

// ---- spherical harmonics (degree <= 3), 3DGS / gsplat basis ordering ----
constexpr float SH_C0 = 0.28209479177387814f;
constexpr float SH_C1 = 0.4886025119029199f;
constexpr float SH_C2[5] = {1.0925484305920792f, -1.0925484305920792f, 0.31539156525252005f,
                            -1.0925484305920792f, 0.5462742152960396f};
constexpr float SH_C3[7] = {-0.5900435899266435f, 2.890611442640554f, -0.4570457994644658f, 0.3731763325901154f,
                            -0.4570457994644658f, 1.445305721320277f, -0.5900435899266435f};

// Basis values B[k] and their derivatives dB[k][0..2] with respect to the unit direction (x, y, z).
LMVIC_INLINE void sh_basis(int degree, float x, float y, float z, float *B, float (*dB)[3]) {
    auto set = [&](int k, float v, float dx, float dy, float dz) {
        B[k] = v;
        if (dB) {
            dB[k][0] = dx;
            dB[k][1] = dy;
            dB[k][2] = dz;
        }
    };
    set(0, SH_C0, 0.f, 0.f, 0.f);
    if (degree < 1) return;
    set(1, -SH_C1 * y, 0.f, -SH_C1, 0.f);
    set(2, SH_C1 * z, 0.f, 0.f, SH_C1);
    set(3, -SH_C1 * x, -SH_C1, 0.f, 0.f);
    if (degree < 2) return;
    const float xx = x * x, yy = y * y, zz = z * z;
    set(4, SH_C2[0] * x * y, SH_C2[0] * y, SH_C2[0] * x, 0.f);
    set(5, SH_C2[1] * y * z, 0.f, SH_C2[1] * z, SH_C2[1] * y);
    set(6, SH_C2[2] * (2 * zz - xx - yy), -2 * SH_C2[2] * x, -2 * SH_C2[2] * y, 4 * SH_C2[2] * z);
    set(7, SH_C2[3] * x * z, SH_C2[3] * z, 0.f, SH_C2[3] * x);
    set(8, SH_C2[4] * (xx - yy), 2 * SH_C2[4] * x, -2 * SH_C2[4] * y, 0.f);
    if (degree < 3) return;
    set(9, SH_C3[0] * y * (3 * xx - yy), SH_C3[0] * 6 * x * y, SH_C3[0] * (3 * xx - 3 * yy), 0.f);
    set(10, SH_C3[1] * x * y * z, SH_C3[1] * y * z, SH_C3[1] * x * z, SH_C3[1] * x * y);
    set(11, SH_C3[2] * y * (4 * zz - xx - yy), SH_C3[2] * (-2 * x * y), SH_C3[2] * (4 * zz - xx - 3 * yy),
        SH_C3[2] * 8 * y * z);
    set(12, SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[3] * (-6 * x * z), SH_C3[3] * (-6 * y * z),
        SH_C3[3] * (6 * zz - 3 * xx - 3 * yy));
    set(13, SH_C3[4] * x * (4 * zz - xx - yy), SH_C3[4] * (4 * zz - 3 * xx - yy), SH_C3[4] * (-2 * x * y),
        SH_C3[4] * 8 * x * z);
    set(14, SH_C3[5] * z * (xx - yy), SH_C3[5] * 2 * x * z, SH_C3[5] * (-2 * y * z), SH_C3[5] * (xx - yy));
    set(15, SH_C3[6] * x * (xx - 3 * yy), SH_C3[6] * (3 * xx - 3 * yy), SH_C3[6] * (-6 * x * y), 0.f);
}

// Unit direction from the camera centre to the mean, and 1 / distance.
struct ViewDir {
    float n[3], inv;
};

LMVIC_INLINE ViewDir view_dir(const float *mean, const Camera &cam) {
    const float d[3] = {mean[0] - cam.centre[0], mean[1] - cam.centre[1], mean[2] - cam.centre[2]};
    ViewDir v;
    v.inv = 1.f / std::max(std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), 1e-12f);
    for (int a = 0; a < 3; ++a) v.n[a] = d[a] * v.inv;
    return v;
}

// Settings shared by the forward and backward passes.
struct Settings {
    int width, height;
    float eps2d, near_plane, far_plane, radius_clip;
    bool compensate;
    int sh_degree;  // < 0: no SH colours
};

// Read-only per-Gaussian inputs.
struct Inputs {
    int64_t N, C, K;
    const float *means, *quats, *scales, *opacities, *coeffs;  // coeffs [N, K, 3] or null
    std::vector<Camera> cams;

    Inputs(const torch::Tensor &means_, const torch::Tensor &quats_, const torch::Tensor &scales_,
           const torch::Tensor &opacities_, const torch::Tensor &coeffs_, const torch::Tensor &viewmats,
           const torch::Tensor &Ks, int sh_degree) {
        for (auto *t : {&means_, &quats_, &scales_, &opacities_, &viewmats, &Ks}) check_float(*t, "projection input");
        N = means_.size(0);
        C = viewmats.size(0);
        means = means_.data_ptr<float>();
        quats = quats_.data_ptr<float>();
        scales = scales_.data_ptr<float>();
        opacities = opacities_.data_ptr<float>();
        coeffs = nullptr;
        K = 0;
        if (sh_degree >= 0) {
            check_float(coeffs_, "SH coefficients");
            TORCH_CHECK(sh_degree <= 3, "sh_degree must be in 0..3");
            K = coeffs_.size(1);
            TORCH_CHECK(coeffs_.dim() == 3 && coeffs_.size(0) == N && coeffs_.size(2) == 3 &&
                            K >= (sh_degree + 1) * (sh_degree + 1),
                        "SH coefficients must be [N, >=(degree+1)^2, 3]");
            coeffs = coeffs_.data_ptr<float>();
        }
        const float *vm = viewmats.data_ptr<float>(), *k = Ks.data_ptr<float>();
        for (int64_t c = 0; c < C; ++c) cams.push_back(camera(vm + 16 * c, k + 9 * c));
    }
};

// Dense per-entry outputs of the forward ([C, N, ...]; null where not requested).
struct DenseOut {
    int32_t *rad;
    float *m2, *dep, *con, *op, *col, *cmp;
};

// Projection of Gaussian g into every camera (one thread owns a Gaussian across all cameras).
LMVIC_INLINE void forward_gaussian(const Inputs &in, const Settings &set, const DenseOut &o, int64_t g) {
    const int64_t N = in.N, C = in.C;
    const int nb = set.sh_degree >= 0 ? (set.sh_degree + 1) * (set.sh_degree + 1) : 0;
    int32_t *rad = o.rad;
    float *m2 = o.m2, *dep = o.dep, *con = o.con, *op = o.op, *col = o.col, *cmp = o.cmp;
    const Shape shp = shape(in.quats + 4 * g, in.scales + 3 * g);
    const float *mu = in.means + 3 * g;
    for (int64_t c = 0; c < C; ++c) {
        const int64_t i = c * N + g;
        rad[2 * i] = rad[2 * i + 1] = 0;
        m2[2 * i] = m2[2 * i + 1] = dep[i] = con[3 * i] = con[3 * i + 1] = con[3 * i + 2] = op[i] = 0.f;
        if (col) col[3 * i] = col[3 * i + 1] = col[3 * i + 2] = 0.f;
        if (cmp) cmp[i] = 0.f;
        const Projected p = project(shp, mu, in.cams[c], set.width, set.height, set.eps2d, set.near_plane,
                                    set.far_plane);
        if (!p.valid) continue;
        const float comp = std::sqrt(std::max(0.f, p.det_orig / p.det));
        const float opacity = in.opacities[g] * (set.compensate ? comp : 1.f);
        if (opacity < kAlphaThreshold) continue;
        const float extent = std::min(3.33f, std::sqrt(2.f * std::log(opacity / kAlphaThreshold)));
        const float rx = std::ceil(extent * std::sqrt(p.a)), ry = std::ceil(extent * std::sqrt(p.c));
        if (rx <= set.radius_clip && ry <= set.radius_clip) continue;
        if (p.mx + rx <= 0 || p.mx - rx >= set.width || p.my + ry <= 0 || p.my - ry >= set.height) continue;
        rad[2 * i] = (int32_t)rx;
        rad[2 * i + 1] = (int32_t)ry;
        m2[2 * i] = p.mx;
        m2[2 * i + 1] = p.my;
        dep[i] = p.pz;
        con[3 * i] = p.c / p.det;
        con[3 * i + 1] = -p.b / p.det;
        con[3 * i + 2] = p.a / p.det;
        op[i] = opacity;
        if (cmp) cmp[i] = comp;
        if (col) {
            const ViewDir v = view_dir(mu, in.cams[c]);
            float B[16];
            sh_basis(set.sh_degree, v.n[0], v.n[1], v.n[2], B, nullptr);
            const float *co = in.coeffs + g * in.K * 3;
            for (int ch = 0; ch < 3; ++ch) {
                float value = 0.5f;
                for (int b = 0; b < nb; ++b) value += B[b] * co[3 * b + ch];
                col[3 * i + ch] = std::max(value, 0.f);
            }
        }
    }
}

// Gradients flowing in (per entry) and out (per Gaussian) of the backward; null where absent.
struct Gradients {
    const int32_t *eo;                       // [C, N] entry of each pair or -1
    const float *cmp, *col, *vcol;           // compensations, colours and their gradient
    const float *vm2, *vdep, *vcon, *vop;    // gradients of the other outputs
    float *gmu, *gq, *gs, *gop, *gco;        // gradients of the inputs
};

// Gradients of Gaussian g, summed over the cameras.
LMVIC_INLINE void backward_gaussian(const Inputs &in, const Settings &set, const Gradients &io, int64_t g) {
    const int64_t N = in.N, C = in.C, K = in.K;
    const bool sh = set.sh_degree >= 0;
    const int nb = sh ? (set.sh_degree + 1) * (set.sh_degree + 1) : 0;
    const float eps = set.eps2d;
    const int32_t *eo = io.eo;
    const float *cmp = io.cmp, *col = io.col, *vcol = io.vcol, *vm2 = io.vm2, *vdep = io.vdep, *vcon = io.vcon;
    const float *vop = io.vop;
    float *gmu = io.gmu, *gq = io.gq, *gs = io.gs, *gop = io.gop, *gco = io.gco;
    const Shape shp = shape(in.quats + 4 * g, in.scales + 3 * g);
    const float *mu = in.means + 3 * g;
    const float *s = in.scales + 3 * g;
    Mat3 v_cov{};  // world covariance gradient, summed over cameras
    float v_mu[3] = {0.f, 0.f, 0.f}, v_o = 0.f;
    float v_co[16][3] = {};
    for (int64_t c = 0; c < C; ++c) {
        const int64_t i = eo[c * N + g];
        if (i < 0) continue;
        const Camera &cam = in.cams[c];
        const Projected p = project(shp, mu, cam, set.width, set.height, eps, -INFINITY, INFINITY);
        // entry opacity = opacity * compensation
        v_o += vop[i] * (cmp ? cmp[i] : 1.f);
        // conic = inverse(S2) with S2 = [[a, b], [b, c]]: v_S2 = -P G P, G = [[v0, v1/2], [v1/2, v2]]
        const float P00 = p.c / p.det, P01 = -p.b / p.det, P11 = p.a / p.det;
        const float G00 = vcon[3 * i], G01 = 0.5f * vcon[3 * i + 1], G11 = vcon[3 * i + 2];
        const float PG00 = P00 * G00 + P01 * G01, PG01 = P00 * G01 + P01 * G11;
        const float PG10 = P01 * G00 + P11 * G01, PG11 = P01 * G01 + P11 * G11;
        float vS[2][2] = {{-(PG00 * P00 + PG01 * P01), -(PG00 * P01 + PG01 * P11)},
                          {-(PG10 * P00 + PG11 * P01), -(PG10 * P01 + PG11 * P11)}};
        if (cmp) {  // comp = sqrt(det_orig / det): d comp^2 / d S2 = (1 - comp^2) P - eps I / det
            const float comp2 = std::max(0.f, p.det_orig / p.det);
            if (comp2 > 0.f) {
                const float f = vop[i] * in.opacities[g] / (2.f * std::sqrt(comp2));
                vS[0][0] += f * ((1 - comp2) * P00 - eps / p.det);
                vS[0][1] += f * (1 - comp2) * P01;
                vS[1][0] += f * (1 - comp2) * P01;
                vS[1][1] += f * ((1 - comp2) * P11 - eps / p.det);
            }
        }
        // cov2d = J S_c J^T: v_J = 2 vS J S_c, v_S_c = J^T vS J
        float JS[2][3], vJ[2][3];
        for (int r = 0; r < 2; ++r)
            for (int j = 0; j < 3; ++j)
                JS[r][j] = p.J[r][0] * p.cov_c[0][j] + p.J[r][1] * p.cov_c[1][j] + p.J[r][2] * p.cov_c[2][j];
        for (int r = 0; r < 2; ++r)
            for (int j = 0; j < 3; ++j) vJ[r][j] = 2.f * (vS[r][0] * JS[0][j] + vS[r][1] * JS[1][j]);
        Mat3 v_cov_c{};
        for (int a = 0; a < 3; ++a)
            for (int b = 0; b < 3; ++b)
                for (int r = 0; r < 2; ++r)
                    v_cov_c[a][b] += p.J[r][a] * (vS[r][0] * p.J[0][b] + vS[r][1] * p.J[1][b]);
        // camera-space mean: from the 2-D mean, the depth and the Jacobian
        const float rz = 1.f / p.pz, rz2 = rz * rz, rz3 = rz2 * rz;
        const float vmx = vm2[2 * i], vmy = vm2[2 * i + 1];
        float vp[3] = {cam.fx * rz * vmx, cam.fy * rz * vmy,
                       -(cam.fx * p.px * vmx + cam.fy * p.py * vmy) * rz2 + vdep[i]};
        const float tx = p.tx, ty = p.ty;
        if (!p.clamp_x) vp[0] += -cam.fx * rz2 * vJ[0][2];
        else vp[2] += -cam.fx * rz3 * vJ[0][2] * tx;
        if (!p.clamp_y) vp[1] += -cam.fy * rz2 * vJ[1][2];
        else vp[2] += -cam.fy * rz3 * vJ[1][2] * ty;
        vp[2] += -cam.fx * rz2 * vJ[0][0] - cam.fy * rz2 * vJ[1][1] + 2.f * cam.fx * tx * rz3 * vJ[0][2] +
                 2.f * cam.fy * ty * rz3 * vJ[1][2];
        for (int a = 0; a < 3; ++a) v_mu[a] += cam.R[0][a] * vp[0] + cam.R[1][a] * vp[1] + cam.R[2][a] * vp[2];
        const Mat3 vc = matmul(matmul(transpose(cam.R), v_cov_c), cam.R);
        for (int a = 0; a < 3; ++a)
            for (int b = 0; b < 3; ++b) v_cov[a][b] += vc[a][b];
        if (!sh) continue;
        // colour = max(sum_b B_b(dir) coeffs_b + 0.5, 0): no gradient where clamped
        float vrgb[3];
        bool any = false;
        for (int ch = 0; ch < 3; ++ch) {
            vrgb[ch] = col[3 * i + ch] > 0.f ? vcol[3 * i + ch] : 0.f;
            any |= vrgb[ch] != 0.f;
        }
        if (!any) continue;
        const ViewDir v = view_dir(mu, cam);
        float B[16], dB[16][3];
        sh_basis(set.sh_degree, v.n[0], v.n[1], v.n[2], B, dB);
        const float *co = in.coeffs + g * K * 3;
        float vn[3] = {0.f, 0.f, 0.f};
        for (int b = 0; b < nb; ++b) {
            float vB = 0.f;
            for (int ch = 0; ch < 3; ++ch) {
                v_co[b][ch] += B[b] * vrgb[ch];
                vB += co[3 * b + ch] * vrgb[ch];
            }
            for (int a = 0; a < 3; ++a) vn[a] += vB * dB[b][a];
        }
        const float dot = vn[0] * v.n[0] + vn[1] * v.n[1] + vn[2] * v.n[2];
        for (int a = 0; a < 3; ++a) v_mu[a] += (vn[a] - dot * v.n[a]) * v.inv;
    }
    for (int a = 0; a < 3; ++a) gmu[3 * g + a] = v_mu[a];
    gop[g] = v_o;
    if (gco)
        for (int b = 0; b < K; ++b)
            for (int ch = 0; ch < 3; ++ch) gco[(g * K + b) * 3 + ch] = b < nb ? v_co[b][ch] : 0.f;
    // cov = M M^T (v_cov symmetric): v_M = 2 v_cov M; M = R diag(s)
    const Mat3 vM = matmul(v_cov, shp.M);
    Mat3 vR{};
    for (int a = 0; a < 3; ++a) {
        float acc = 0.f;
        for (int r = 0; r < 3; ++r) {
            vR[r][a] = 2.f * vM[r][a] * s[a];
            acc += 2.f * vM[r][a] * shp.R[r][a];
        }
        gs[3 * g + a] = acc;
    }
    const float w = shp.qn[0], x = shp.qn[1], y = shp.qn[2], z = shp.qn[3];
    const float vqn[4] = {
        2.f * (-z * vR[0][1] + y * vR[0][2] + z * vR[1][0] - x * vR[1][2] - y * vR[2][0] + x * vR[2][1]),
        2.f * (y * vR[0][1] + z * vR[0][2] + y * vR[1][0] - 2 * x * vR[1][1] - w * vR[1][2] + z * vR[2][0] +
               w * vR[2][1] - 2 * x * vR[2][2]),
        2.f * (-2 * y * vR[0][0] + x * vR[0][1] + w * vR[0][2] + x * vR[1][0] + z * vR[1][2] - w * vR[2][0] +
               z * vR[2][1] - 2 * y * vR[2][2]),
        2.f * (-2 * z * vR[0][0] - w * vR[0][1] + x * vR[0][2] + w * vR[1][0] - 2 * z * vR[1][1] + y * vR[1][2] +
               x * vR[2][0] + y * vR[2][1]),
    };
    const float dot = vqn[0] * w + vqn[1] * x + vqn[2] * y + vqn[3] * z;
    const float inv = 1.f / std::max(shp.qnorm, 1e-12f);
    for (int a = 0; a < 4; ++a) gq[4 * g + a] = (vqn[a] - dot * shp.qn[a]) * inv;
}

// Both built for the baseline target and for AVX2 + FMA (chosen at run time).
void forward_gaussian_base(const Inputs &in, const Settings &set, const DenseOut &o, int64_t g) {
    forward_gaussian(in, set, o, g);
}
LMVIC_AVX2 void forward_gaussian_avx2(const Inputs &in, const Settings &set, const DenseOut &o, int64_t g) {
    forward_gaussian(in, set, o, g);
}
void backward_gaussian_base(const Inputs &in, const Settings &set, const Gradients &io, int64_t g) {
    backward_gaussian(in, set, io, g);
}
LMVIC_AVX2 void backward_gaussian_avx2(const Inputs &in, const Settings &set, const Gradients &io, int64_t g) {
    backward_gaussian(in, set, io, g);
}

}  // namespace

// Projection, opacity (times the antialiasing compensation) and SH colour of every (camera,
// Gaussian) pair. Dense: E = C*N entries with shape [C, N, ...], culled ones with radii 0 and zero
// outputs. Packed: only the E = nnz visible entries, camera-major then by Gaussian, shape [nnz, ...].
// Returns (radii [E,2] int32, means2d [E,2], depths [E], conics [E,3], opacities [E], colors [E,3]
// (empty without SH), compensations [E] (empty unless requested), entry_of [C,N] int32 (the entry
// of each pair or -1 if culled), camera_ids [E] int64, gaussian_ids [E] int64 (both empty if dense)).
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor opacities, torch::Tensor coeffs, torch::Tensor viewmats,
                                           torch::Tensor Ks, int64_t sh_degree, int64_t width, int64_t height,
                                           double eps2d, double near_plane, double far_plane, double radius_clip,
                                           bool calc_compensations, bool packed) {
    const Settings set{(int)width, (int)height, (float)eps2d, (float)near_plane, (float)far_plane,
                       (float)radius_clip, calc_compensations, (int)sh_degree};
    const Inputs in(means, quats, scales, opacities, coeffs, viewmats, Ks, set.sh_degree);
    const int64_t N = in.N, C = in.C;
    const bool sh = set.sh_degree >= 0;
    const int nb = sh ? (set.sh_degree + 1) * (set.sh_degree + 1) : 0;
    auto f32 = torch::dtype(torch::kFloat32);
    // dense results first ([C, N] order), compacted afterwards when packed
    auto radii = torch::empty({C, N, 2}, torch::dtype(torch::kInt32));
    auto means2d = torch::empty({C, N, 2}, f32);
    auto depths = torch::empty({C, N}, f32);
    auto conics = torch::empty({C, N, 3}, f32);
    auto opac = torch::empty({C, N}, f32);
    auto colors = torch::empty({sh ? C : 0, N, 3}, f32);
    auto comps = torch::empty({calc_compensations ? C : 0, N}, f32);
    int32_t *rad = radii.data_ptr<int32_t>();
    float *m2 = means2d.data_ptr<float>(), *dep = depths.data_ptr<float>(), *con = conics.data_ptr<float>();
    float *op = opac.data_ptr<float>(), *col = sh ? colors.data_ptr<float>() : nullptr;
    float *cmp = calc_compensations ? comps.data_ptr<float>() : nullptr;

    const DenseOut out{rad, m2, dep, con, op, col, cmp};
    auto *one = has_avx2() ? &forward_gaussian_avx2 : &forward_gaussian_base;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < N; ++g) one(in, set, out, g);

    auto entry_of = torch::empty({C, N}, torch::dtype(torch::kInt32));
    int32_t *eo = entry_of.data_ptr<int32_t>();
    int64_t nnz = 0;
    for (int64_t i = 0; i < C * N; ++i) eo[i] = rad[2 * i] > 0 && rad[2 * i + 1] > 0 ? (int32_t)(packed ? nnz++ : i) : -1;
    if (!packed) {
        auto none = torch::empty({0}, torch::dtype(torch::kInt64));
        return {radii, means2d, depths, conics, opac, colors, comps, entry_of, none, none};
    }
    // compaction, parallel: row i of every dense result goes to row eo[i]
    auto camera_ids = torch::empty({nnz}, torch::dtype(torch::kInt64));
    auto gaussian_ids = torch::empty({nnz}, torch::dtype(torch::kInt64));
    int64_t *cid = camera_ids.data_ptr<int64_t>(), *gid = gaussian_ids.data_ptr<int64_t>();
    auto packed_like = [&](const torch::Tensor &dense, int64_t w) {
        return dense.dim() == 3 ? torch::empty({nnz, w}, dense.options()) : torch::empty({nnz}, dense.options());
    };
    auto p_radii = packed_like(radii, 2), p_means2d = packed_like(means2d, 2), p_depths = packed_like(depths, 1);
    auto p_conics = packed_like(conics, 3), p_opac = packed_like(opac, 1);
    auto p_colors = sh ? packed_like(colors, 3) : colors, p_comps = cmp ? packed_like(comps, 1) : comps;
    int32_t *prad = p_radii.data_ptr<int32_t>();
    float *pm2 = p_means2d.data_ptr<float>(), *pdep = p_depths.data_ptr<float>(), *pcon = p_conics.data_ptr<float>();
    float *pop = p_opac.data_ptr<float>(), *pcol = sh ? p_colors.data_ptr<float>() : nullptr;
    float *pcmp = cmp ? p_comps.data_ptr<float>() : nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < C * N; ++i) {
        const int64_t e = eo[i];
        if (e < 0) continue;
        cid[e] = i / N;
        gid[e] = i % N;
        for (int k = 0; k < 2; ++k) {
            prad[2 * e + k] = rad[2 * i + k];
            pm2[2 * e + k] = m2[2 * i + k];
        }
        for (int k = 0; k < 3; ++k) pcon[3 * e + k] = con[3 * i + k];
        if (pcol)
            for (int k = 0; k < 3; ++k) pcol[3 * e + k] = col[3 * i + k];
        pdep[e] = dep[i];
        pop[e] = op[i];
        if (pcmp) pcmp[e] = cmp[i];
    }
    return {p_radii, p_means2d, p_depths, p_conics, p_opac, p_colors, p_comps, entry_of, camera_ids, gaussian_ids};
}

// Gradients of project_forward's differentiable outputs (means2d, depths, conics, opacities,
// colors: flattened over the E entries) with respect to its inputs. Returns (v_means [N,3],
// v_quats [N,4], v_scales [N,3], v_opacities [N], v_coeffs [N,K,3] (empty without SH)).
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor opacities, torch::Tensor coeffs, torch::Tensor viewmats,
                                            torch::Tensor Ks, int64_t sh_degree, int64_t width, int64_t height,
                                            double eps2d, torch::Tensor entry_of, torch::Tensor compensations,
                                            torch::Tensor colors, torch::Tensor v_means2d, torch::Tensor v_depths,
                                            torch::Tensor v_conics, torch::Tensor v_opacities,
                                            torch::Tensor v_colors) {
    const Settings set{(int)width, (int)height, (float)eps2d, -INFINITY, INFINITY, 0.f, compensations.numel() > 0,
                       (int)sh_degree};
    const Inputs in(means, quats, scales, opacities, coeffs, viewmats, Ks, set.sh_degree);
    for (auto *t : {&v_means2d, &v_depths, &v_conics, &v_opacities}) check_float(*t, "projection gradient");
    TORCH_CHECK(entry_of.scalar_type() == torch::kInt32 && entry_of.is_contiguous(), "entry_of must be int32");
    const int64_t N = in.N, C = in.C, K = in.K;
    const bool sh = set.sh_degree >= 0;
    const int nb = sh ? (set.sh_degree + 1) * (set.sh_degree + 1) : 0;
    if (sh) {
        check_float(colors, "colors");
        check_float(v_colors, "colour gradient");
    }
    auto f32 = torch::dtype(torch::kFloat32);
    auto v_means = torch::empty({N, 3}, f32);
    auto v_quats = torch::empty({N, 4}, f32);
    auto v_scales = torch::empty({N, 3}, f32);
    auto v_opac = torch::empty({N}, f32);
    auto v_coeffs = torch::empty({sh ? N : 0, K, 3}, f32);
    const int32_t *eo = entry_of.data_ptr<int32_t>();
    const float *cmp = set.compensate ? compensations.data_ptr<float>() : nullptr;
    const float *col = sh ? colors.data_ptr<float>() : nullptr, *vcol = sh ? v_colors.data_ptr<float>() : nullptr;
    const float *vm2 = v_means2d.data_ptr<float>(), *vdep = v_depths.data_ptr<float>();
    const float *vcon = v_conics.data_ptr<float>(), *vop = v_opacities.data_ptr<float>();
    float *gmu = v_means.data_ptr<float>(), *gq = v_quats.data_ptr<float>(), *gs = v_scales.data_ptr<float>();
    float *gop = v_opac.data_ptr<float>(), *gco = sh ? v_coeffs.data_ptr<float>() : nullptr;
    const float eps = set.eps2d;

    const Gradients io{eo, cmp, col, vcol, vm2, vdep, vcon, vop, gmu, gq, gs, gop, gco};
    auto *one = has_avx2() ? &backward_gaussian_avx2 : &backward_gaussian_base;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < N; ++g) one(in, set, io, g);
    return {v_means, v_quats, v_scales, v_opac, v_coeffs};
}
