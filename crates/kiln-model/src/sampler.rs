//! Choosing the next token from a row of logits: greedy at temperature 0, else a draw from
//! softmax(logits / T) restricted, in this order, to the `top_k` likeliest tokens, the
//! smallest set whose probability reaches `top_p`, and the tokens at least `min_p` times as
//! likely as the likeliest. The log-prob reported is the model's own, log softmax(logits), of
//! the chosen token: what a training step computes for it.

use kiln_core::fast_exp::fast_exp;
use kiln_core::reduce;
use kiln_core::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (not included in its output).
    pub stop_ids: Vec<i32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, max_new_tokens: 256, stop_ids: Vec::new(), seed: 0 }
    }
}

/// `log softmax(logits)[token]` and the entropy of softmax(logits), in one pass:
///   with z_i = x_i − max x, Z = Σ e^{z_i}:  log p_token = z_token − log Z,
///   H = −Σ p_i log p_i = log Z − Σ e^{z_i} z_i / Z.
pub fn logprob_entropy(logits: &[f32], token: usize) -> (f32, f32) {
    let max = reduce::max(logits);
    // The exponentials vectorise in f32 (relative error below 2e-7); the sums are f64. A
    // masked (−∞) logit has probability 0 and adds nothing to either sum.
    let exps: Vec<f32> = logits.iter().map(|&x| if x > f32::NEG_INFINITY { fast_exp(x - max) } else { 0.0 }).collect();
    let z_sum = sum_f64(&exps);
    let weighted = lanes_f64(logits, &exps, |x, e| if e > 0.0 { e as f64 * (x - max) as f64 } else { 0.0 });
    let log_z = z_sum.ln();
    (((logits[token] - max) as f64 - log_z) as f32, (log_z - weighted / z_sum) as f32)
}

/// The next token under `p`, drawn with `rng`. Without filters it draws straight from the
/// softmax; filters sort only the candidates they keep.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> usize {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    if p.temperature <= 0.0 {
        return argmax().0;
    }
    let max = reduce::max(logits);
    // e^((x − max)/T), exactly 0 for a masked (−∞) logit.
    let weight = |x: f32| if x > f32::NEG_INFINITY { fast_exp((x - max) / p.temperature) } else { 0.0 };
    if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
        let weights: Vec<f32> = logits.iter().map(|&x| weight(x)).collect();
        return draw_index(&weights, rng.uniform() * sum_f64(&weights));
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    if p.top_k > 0 && p.top_k < order.len() {
        order.select_nth_unstable_by(p.top_k - 1, by_logit);
        order.truncate(p.top_k);
    }
    order.sort_unstable_by(by_logit);
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(logits[i]) as f64).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        keep = probs
            .iter()
            .position(|&x| {
                cum += x;
                cum >= p.top_p as f64
            })
            .map_or(keep, |i| i + 1);
    }
    if p.min_p > 0.0 {
        let floor = p.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
    }
    let total: f64 = probs[..keep].iter().sum();
    let mut u = rng.uniform() * total;
    for (i, &x) in probs[..keep].iter().enumerate() {
        u -= x;
        if u <= 0.0 {
            return order[i];
        }
    }
    order[keep - 1]
}

/// The first index at which the running sum of `weights` (f64) reaches `u`, the last if none
/// does: chunk sums find the chunk, then its weights one by one.
fn draw_index(weights: &[f32], mut u: f64) -> usize {
    const CHUNK: usize = 256;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let total = sum_f64(chunk);
        if u <= total {
            for (i, &w) in chunk.iter().enumerate() {
                u -= w as f64;
                if u <= 0.0 {
                    return c * CHUNK + i;
                }
            }
            return c * CHUNK + chunk.len() - 1;
        }
        u -= total;
    }
    weights.len() - 1
}

/// `Σ xs` in f64.
fn sum_f64(xs: &[f32]) -> f64 {
    lanes_f64(xs, xs, |x, _| x as f64)
}

/// `Σ_i term(a_i, b_i)` in 8 f64 partial sums (a sequential f64 sum runs at one add per four
/// cycles; partial sums vectorise).
fn lanes_f64(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f64) -> f64 {
    let ((a8, a_tail), (b8, b_tail)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    let mut lanes = [0f64; 8];
    for (x, y) in a8.iter().zip(b8) {
        lanes = std::array::from_fn(|l| lanes[l] + term(x[l], y[l]));
    }
    lanes.iter().sum::<f64>() + a_tail.iter().zip(b_tail).map(|(&x, &y)| term(x, y)).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_draws_follow_the_distribution() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, -5.0];
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(sample(&logits, &greedy, &mut Rng::new(1)), 0);
        let draw = |p: &SamplingParams| {
            let mut rng = Rng::new(7);
            let mut counts = [0usize; 5];
            (0..20_000).for_each(|_| counts[sample(&logits, p, &mut rng)] += 1);
            counts
        };
        let counts = draw(&SamplingParams::default());
        let p0 = (2.0f64).exp() / logits.iter().map(|&x| (x as f64).exp()).sum::<f64>();
        assert!((counts[0] as f64 / 20_000.0 - p0).abs() < 0.02, "{counts:?} vs p0 {p0}");
        assert_eq!(draw(&SamplingParams { top_k: 2, ..Default::default() })[2..], [0, 0, 0]);
        // softmax ≈ [.64, .24, .09, .03, .0004]: top_p 0.8 keeps two tokens, min_p 0.2 keeps two.
        assert_eq!(draw(&SamplingParams { top_p: 0.8, ..Default::default() })[2..], [0, 0, 0]);
        assert_eq!(draw(&SamplingParams { min_p: 0.2, ..Default::default() })[2..], [0, 0, 0]);
        let (lp, entropy) = logprob_entropy(&logits, 0);
        assert!((lp as f64 - p0.ln()).abs() < 1e-6);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let h: f64 = logits.iter().map(|&x| (x as f64).exp() / z).map(|p| -p * p.ln()).sum();
        assert!((entropy as f64 - h).abs() < 1e-6, "entropy {entropy} vs {h}");
        // A masked (−∞) logit changes neither, and is never drawn.
        let masked = [2.0f32, 1.0, 0.0, -1.0, -5.0, f32::NEG_INFINITY];
        let (lp, entropy) = logprob_entropy(&masked, 0);
        assert!((lp as f64 - p0.ln()).abs() < 1e-6 && (entropy as f64 - h).abs() < 1e-6, "{lp}, {entropy}");
        let mut rng = Rng::new(3);
        assert!((0..20_000).all(|_| sample(&masked, &SamplingParams::default(), &mut rng) != 5));
    }

    #[test]
    fn chunked_draw_picks_the_index_a_running_sum_picks() {
        let mut rng = Rng::new(9);
        let weights: Vec<f32> = (0..1000).map(|_| rng.uniform() as f32).collect();
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        for _ in 0..1000 {
            let u = rng.uniform() * total;
            let mut left = u;
            let want = weights.iter().position(|&w| {
                left -= w as f64;
                left <= 0.0
            });
            assert_eq!(draw_index(&weights, u), want.unwrap_or(weights.len() - 1), "u = {u}");
        }
        assert_eq!(draw_index(&weights, 2.0 * total), weights.len() - 1);
        // Sums of a thousand f32s in [0, 1) are exact in f64, in any order.
        assert_eq!((reduce::max(&weights), sum_f64(&weights)), (weights.iter().copied().fold(0.0, f32::max), total));
    }
}
