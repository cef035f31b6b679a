// The tiled attention kernels of crates/kiln-cuda/src/kernels/attention.cu, run on the CPU by
// cuda_on_cpu.h, against a double-precision reference; see run.sh.
#include "cuda_on_cpu.h"
#include <cstdio>
#include <random>
#include <algorithm>
#include "kernels.inc"

struct Spec { long batch, seq; int q_heads, kv_heads, hd, vhd; float scale; long window; };
struct Tiling { long blocks; int warps, positions, heads, tile; };

static int largest_tile(std::function<long(int)> floats) {
    for (int t : {32, 16, 8}) if (4 * floats(t) <= 48 * 1024) return t;
    abort();
}
static Tiling query_rows(const Spec& s, bool per_warp_v) {
    int group = s.q_heads / s.kv_heads, heads = 1;
    for (int h = std::min(8, group); h >= 1; h--) if (group % h == 0) { heads = h; break; }
    int positions = 8 / heads, warps = positions * heads;
    long per_warp = warps * (s.hd + (per_warp_v ? s.vhd : 0));
    int tile = largest_tile([&](int t) { return t * (s.hd + 1) + t * (s.vhd + 1) + per_warp; });
    long blocks = s.batch * s.kv_heads * (group / heads) * ((s.seq + positions - 1) / positions);
    return {blocks, warps, positions, heads, tile};
}
static Tiling key_rows(const Spec& s) {
    int tile = largest_tile([&](int t) { return t * (s.hd + 1) + t * (s.vhd + 1) + 2 * t + 8 * (s.hd + s.vhd); });
    return {s.batch * s.kv_heads * ((s.seq + 7) / 8), 8, 8, 1, tile};
}

static float round_bf16(float x) { unsigned u; std::memcpy(&u, &x, 4); u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u; std::memcpy(&x, &u, 4); return x; }

static int check(Spec s, bool bf16);

int main() {
    std::vector<Spec> specs = {
        {2, 37, 4, 2, 48, 40, 0.3f, 0}, {2, 37, 4, 2, 48, 40, 0.3f, 9}, {1, 45, 3, 1, 64, 64, 0.2f, 0},
        {1, 20, 12, 4, 32, 32, 0.25f, 5}, {1, 19, 2, 2, 192, 128, 0.1f, 0}, {1, 11, 2, 1, 256, 256, 0.08f, 0},
        {1, 70, 16, 1, 16, 8, 0.5f, 0},
    };
    std::vector<Spec> mma_specs = {
        {2, 37, 4, 2, 48, 32, 0.3f, 0}, {2, 37, 4, 2, 48, 32, 0.3f, 9}, {1, 45, 3, 1, 64, 64, 0.2f, 0},
        {1, 20, 12, 4, 32, 32, 0.25f, 5}, {1, 70, 16, 1, 16, 16, 0.5f, 0}, {1, 150, 2, 1, 128, 128, 0.1f, 0},
        {1, 150, 2, 2, 64, 64, 0.15f, 40},
    };
    int failures = 0;
    for (auto s : specs) failures += check(s, false);
    for (auto s : mma_specs) failures += check(s, true);
    printf(failures ? "FAILED\n" : "all agree\n");
    return failures != 0;
}

// Runs the f32 kernels (or, with `bf16`, the tensor-core ones, against a reference on inputs
// rounded to bf16) on one shape; the number of outputs that disagree.
static int check(Spec s, bool bf16) {
    int failures = 0;
    {
        std::mt19937 gen(7);
        std::normal_distribution<float> nd(0, 1);
        long T = s.batch * s.seq;
        auto rnd = [&](long n) { std::vector<float> v(n); for (auto& x : v) x = nd(gen); return v; };
        auto q = rnd(T * s.q_heads * s.hd), k = rnd(T * s.kv_heads * s.hd), v = rnd(T * s.kv_heads * s.vhd);
        auto dout = rnd(T * s.q_heads * s.vhd);
        // The reference sees what the tensor cores see.
        auto rounded = [&](std::vector<float> x) { if (bf16) for (auto& e : x) e = round_bf16(e); return x; };
        auto qr = rounded(q), kr_ = rounded(k), vr = rounded(v), doutr = rounded(dout);
        std::vector<int> seg(T);
        // Even rows: three packed sequences. Odd rows: two groups (segment group << 16 | member),
        // each a shared prefix (member 0xffff) then two completions that see it.
        const int prefix = 0xffff;
        for (long t = 0; t < T; t++) {
            long i = t % s.seq, b = t / s.seq;
            if (b % 2 == 0) {
                seg[t] = i < s.seq / 3 ? 0 : (i < s.seq * 3 / 4 ? 1 : 2);
            } else {
                int group = i < s.seq / 2 ? 0 : 1;
                long at = i - group * (s.seq / 2), part = s.seq / 6;
                seg[t] = group << 16 | (at < part ? prefix : (at < 2 * part ? 0 : 1));
            }
        }
        auto sees = [&](long ti, long tj) {
            const bool own_prefix = seg[ti] >= 0 && (seg[tj] & 0xffff) == prefix && seg[ti] >> 16 == seg[tj] >> 16;
            return seg[tj] == seg[ti] || own_prefix;
        };
        // Reference in double.
        int group = s.q_heads / s.kv_heads;
        std::vector<double> out_r(T * s.q_heads * s.vhd), lse_r(s.batch * s.q_heads * s.seq), dq_r(q.size()), dk_r(k.size()), dv_r(v.size());
        for (long b = 0; b < s.batch; b++) for (int h = 0; h < s.q_heads; h++) for (long i = 0; i < s.seq; i++) {
            int kvh = h / group; long ti = b * s.seq + i;
            std::vector<double> sc(s.seq, -INFINITY); double mx = -INFINITY;
            for (long j = 0; j <= i; j++) {
                long tj = b * s.seq + j;
                if (!sees(ti, tj) || (s.window > 0 && i - j >= s.window)) continue;
                double acc = 0; for (int d = 0; d < s.hd; d++) acc += (double)qr[(ti * s.q_heads + h) * s.hd + d] * kr_[(tj * s.kv_heads + kvh) * s.hd + d];
                sc[j] = s.scale * acc; mx = std::max(mx, sc[j]);
            }
            double sum = 0; for (long j = 0; j <= i; j++) if (sc[j] > -INFINITY) sum += exp(sc[j] - mx);
            double lse = mx + log(sum); lse_r[(b * s.q_heads + h) * s.seq + i] = lse;
            std::vector<double> p(s.seq, 0); for (long j = 0; j <= i; j++) if (sc[j] > -INFINITY) p[j] = exp(sc[j] - lse);
            double D = 0;
            for (int d = 0; d < s.vhd; d++) { double o = 0; for (long j = 0; j <= i; j++) o += p[j] * vr[((b * s.seq + j) * s.kv_heads + kvh) * s.vhd + d];
                out_r[(ti * s.q_heads + h) * s.vhd + d] = o; D += o * doutr[(ti * s.q_heads + h) * s.vhd + d]; }
            for (long j = 0; j <= i; j++) { if (p[j] == 0) continue; long tj = b * s.seq + j;
                double dp = 0; for (int d = 0; d < s.vhd; d++) dp += (double)doutr[(ti * s.q_heads + h) * s.vhd + d] * vr[(tj * s.kv_heads + kvh) * s.vhd + d];
                double ds = p[j] * (dp - D);
                for (int d = 0; d < s.vhd; d++) dv_r[(tj * s.kv_heads + kvh) * s.vhd + d] += p[j] * doutr[(ti * s.q_heads + h) * s.vhd + d];
                for (int d = 0; d < s.hd; d++) { dq_r[(ti * s.q_heads + h) * s.hd + d] += s.scale * ds * kr_[(tj * s.kv_heads + kvh) * s.hd + d];
                    dk_r[(tj * s.kv_heads + kvh) * s.hd + d] += s.scale * ds * qr[(ti * s.q_heads + h) * s.hd + d]; } }
        }
        std::vector<float> out(out_r.size(), NAN), lse(lse_r.size(), NAN), dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN), delta(lse.size(), NAN);
        Tiling f = query_rows(s, false), g = query_rows(s, true), kr = key_rows(s);
        if (bf16) {
            const long tiles = (s.seq + 63) / 64;
            emu_launch(s.batch * s.q_heads * tiles, 128, [&] { attention_forward_bf16(out.data(), lse.data(), q.data(), k.data(), v.data(), seg.data(), s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window); });
            emu_launch(s.batch * s.q_heads * tiles, 128, [&] { attention_backward_dq_bf16(dq.data(), delta.data(), dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), seg.data(), s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window); });
            emu_launch(s.batch * s.kv_heads * tiles, 128, [&] { attention_backward_dkdv_bf16(dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(), delta.data(), seg.data(), s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window); });
        } else {
        emu_launch(f.blocks, 32 * f.warps, [&] { attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), seg.data(), s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window, f.positions, f.heads, f.tile); });
        emu_launch(g.blocks, 32 * g.warps, [&] { attention_backward_dq(dq.data(), delta.data(), dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), seg.data(), s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window, g.positions, g.heads, g.tile); });
        emu_launch(kr.blocks, 32 * kr.warps, [&] { attention_backward_dkdv(dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(), delta.data(), seg.data(), s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window, kr.positions, kr.heads, kr.tile); });
        }
        auto cmp = [&](const char* name, const std::vector<float>& got, const std::vector<double>& want) {
            double worst = 0, scale = 0; long at = -1;
            for (double w : want) scale = std::max(scale, std::fabs(w));
            for (size_t n = 0; n < want.size(); n++) { double e = std::fabs(got[n] - want[n]) / scale; if (!(e <= worst)) { worst = e; at = n; } }
            bool ok = worst < (bf16 ? 2e-2 : 1e-5);
            printf("  %-4s max err / max |want| %.2e%s\n", name, worst, ok ? "" : "  FAIL");
            if (!ok) { failures++; printf("    at %ld: got %g want %g\n", at, got[at], want[at]); }
        };
        printf("%s batch %ld seq %ld heads %d/%d dims %d/%d window %ld: tiles %d %d %d, warps %d %d\n", bf16 ? "bf16" : "f32 ", s.batch, s.seq, s.q_heads, s.kv_heads, s.hd, s.vhd, s.window, f.tile, g.tile, kr.tile, f.warps, g.warps);
        cmp("out", out, out_r); cmp("lse", lse, lse_r); cmp("dq", dq, dq_r); cmp("dk", dk, dk_r); cmp("dv", dv, dv_r);
    }
    return failures;
}
