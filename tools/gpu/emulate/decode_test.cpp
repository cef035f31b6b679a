// attention_decode.cu's decode attention, each CUDA thread run as a CPU thread (cuda_on_cpu.h),
// against a double-precision reference: every query attends its prompt's range of cache rows
// then its own (either may be empty), the last `window` of the two with a window, over f32 and
// bf16 caches (the reference reads the bf16-rounded rows), ranges longer than one 32-row block.
#include "cuda_on_cpu.h"
#include <cstdio>
#include <random>
#include <algorithm>
#include "decode_kernels.inc"

static float round_bf16(float x) { unsigned u; std::memcpy(&u, &x, 4); u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u; std::memcpy(&x, &u, 4); return x; }
static unsigned short bf16_bits_of(float x) { unsigned u; std::memcpy(&u, &x, 4); return (unsigned short)(u >> 16); }

struct Spec { int q_heads, kv_heads, hd, vhd; float scale; long window; };

// The number of outputs more than 1e-5 of the largest magnitude away from the reference.
static int check(Spec s, bool bf16) {
    const long rows = 120;
    // {prompt start, prompt length, own start, own length} per query.
    const std::vector<std::array<int, 4>> ranges = {
        {0, 40, 80, 7}, {0, 40, 90, 1}, {0, 0, 50, 33}, {100, 20, 0, 0}, {60, 5, 10, 45}, {3, 1, 4, 1},
    };
    const long queries = ranges.size();
    std::mt19937 gen(13);
    std::normal_distribution<float> nd(0, 1);
    auto rnd = [&](long n) { std::vector<float> v(n); for (auto& x : v) x = nd(gen); return v; };
    auto q = rnd(queries * s.q_heads * s.hd);
    auto k = rnd(rows * s.kv_heads * s.hd), v = rnd(rows * s.kv_heads * s.vhd);
    if (bf16) for (auto* x : {&k, &v}) for (auto& e : *x) e = round_bf16(e);
    std::vector<int> starts, lengths;
    for (auto& r : ranges) { starts.insert(starts.end(), {r[0], r[2]}); lengths.insert(lengths.end(), {r[1], r[3]}); }
    std::vector<float> out(queries * s.q_heads * s.vhd, NAN);
    const long warps = queries * s.q_heads;
    if (bf16) {
        std::vector<unsigned short> kb(k.size()), vb(v.size());
        for (size_t i = 0; i < k.size(); i++) kb[i] = bf16_bits_of(k[i]);
        for (size_t i = 0; i < v.size(); i++) vb[i] = bf16_bits_of(v[i]);
        emu_launch((warps + 3) / 4, 128, [&] {
            attention_decode_bf16(out.data(), q.data(), kb.data(), vb.data(), starts.data(), lengths.data(), queries,
                                  s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window);
        });
    } else {
        emu_launch((warps + 3) / 4, 128, [&] {
            attention_decode_f32(out.data(), q.data(), k.data(), v.data(), starts.data(), lengths.data(), queries,
                                 s.q_heads, s.kv_heads, s.hd, s.vhd, s.scale, s.window);
        });
    }
    std::vector<double> want(out.size());
    const int group = s.q_heads / s.kv_heads;
    for (long i = 0; i < queries; i++) {
        std::vector<long> seen;
        for (int j = 0; j < ranges[i][1]; j++) seen.push_back(ranges[i][0] + j);
        for (int j = 0; j < ranges[i][3]; j++) seen.push_back(ranges[i][2] + j);
        if (s.window > 0 && (long)seen.size() > s.window) seen.erase(seen.begin(), seen.end() - s.window);
        for (int h = 0; h < s.q_heads; h++) {
            const int kvh = h / group;
            std::vector<double> sc;
            for (long r : seen) {
                double d = 0;
                for (int f = 0; f < s.hd; f++) d += (double)q[(i * s.q_heads + h) * s.hd + f] * k[(r * s.kv_heads + kvh) * s.hd + f];
                sc.push_back(d * s.scale);
            }
            double m = *std::max_element(sc.begin(), sc.end()), sum = 0;
            for (auto& x : sc) sum += (x = exp(x - m));
            for (int f = 0; f < s.vhd; f++) {
                double o = 0;
                for (size_t j = 0; j < seen.size(); j++) o += sc[j] / sum * v[(seen[j] * s.kv_heads + kvh) * s.vhd + f];
                want[(i * s.q_heads + h) * s.vhd + f] = o;
            }
        }
    }
    double largest = 0, worst = 0;
    for (double w : want) largest = std::max(largest, std::fabs(w));
    int failures = 0;
    for (size_t n = 0; n < want.size(); n++) {
        const double e = std::fabs(out[n] - want[n]);
        worst = std::max(worst, std::isnan(e) ? INFINITY : e);
        failures += !(e <= 1e-5 * largest);
    }
    printf("decode %s heads %d/%d dims %d/%d window %ld: max err %.2e%s\n", bf16 ? "bf16" : "f32 ", s.q_heads, s.kv_heads,
           s.hd, s.vhd, s.window, worst, failures ? "  FAIL" : "");
    return failures;
}

int main() {
    const std::vector<Spec> specs = {
        {4, 2, 48, 40, 0.3f, 0}, {4, 2, 48, 40, 0.3f, 9}, {3, 1, 64, 64, 0.2f, 30}, {2, 1, 256, 192, 0.05f, 0},
    };
    int failures = 0;
    for (auto s : specs) for (bool bf16 : {false, true}) failures += check(s, bf16);
    printf(failures ? "FAILED\n" : "decode agrees\n");
    return failures != 0;
}
