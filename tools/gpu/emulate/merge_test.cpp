// attention_sinks.cu's merge of two attentions by their log-sum-exps, each CUDA thread run as
// a CPU thread (cuda_on_cpu.h), against a double-precision reference:
//   l = log(e^l1 + e^l2),  o = e^(l1 - l)·o1 + e^(l2 - l)·o2,  unchanged where both are -inf.
// lse is [batch, heads, seq], out [batch·seq, heads, dv]; some rows have one side at -inf
// (a query with no compressed entry), one row both.
#include "cuda_on_cpu.h"
#include <cstdio>
#include <random>
#include <algorithm>
#include "merge_kernels.inc"

int main() {
    const long batch = 2, seq = 7, heads = 3, dv = 5, tokens = batch * seq;
    std::mt19937 gen(11);
    std::normal_distribution<float> nd(0, 1);
    auto rnd = [&](long n) { std::vector<float> v(n); for (auto& x : v) x = nd(gen); return v; };
    auto out = rnd(tokens * heads * dv), other = rnd(tokens * heads * dv);
    auto lse = rnd(tokens * heads), other_lse = rnd(tokens * heads);
    for (long i = 0; i < tokens * heads; i += 4) other_lse[i] = -INFINITY;
    lse[5] = -INFINITY;
    lse[9] = other_lse[9] = -INFINITY;
    std::vector<double> out_r(out.begin(), out.end()), lse_r(lse.begin(), lse.end());
    for (long t = 0; t < tokens; t++) for (long h = 0; h < heads; h++) {
        long at = ((t / seq) * heads + h) * seq + t % seq;
        double l1 = lse[at], l2 = other_lse[at];
        if (l1 == -INFINITY && l2 == -INFINITY) continue;
        double l = std::max(l1, l2) + log(exp(l1 - std::max(l1, l2)) + exp(l2 - std::max(l1, l2)));
        for (long d = 0; d < dv; d++) {
            long o = (t * heads + h) * dv + d;
            out_r[o] = exp(l1 - l) * out[o] + exp(l2 - l) * other[o];
        }
        lse_r[at] = l;
    }
    emu_launch(2, 32, [&] { attention_merge(out.data(), lse.data(), other.data(), other_lse.data(), tokens, seq, heads, dv); });
    int failures = 0;
    auto cmp = [&](const char* name, const std::vector<float>& got, const std::vector<double>& want) {
        double worst = 0;
        for (size_t n = 0; n < want.size(); n++) {
            double e = std::isinf(want[n]) ? (got[n] == want[n] ? 0 : INFINITY) : std::fabs(got[n] - want[n]);
            worst = std::max(worst, e);
        }
        bool ok = worst < 1e-5;
        printf("merge %-4s max err %.2e%s\n", name, worst, ok ? "" : "  FAIL");
        failures += !ok;
    };
    cmp("out", out, out_r);
    cmp("lse", lse, lse_r);
    printf(failures ? "FAILED\n" : "merge agrees\n");
    return failures != 0;
}
