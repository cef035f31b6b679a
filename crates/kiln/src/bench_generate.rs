//! `kiln bench generate`: batched sampling with the KV-cache generator, new tokens per second
//! (compare with `python bench/torch_generate.py`, transformers' `generate`, same shape).

use anyhow::Result;
use kiln_core::{rng::Rng, Backend};
use kiln_model::generator::{generate, Request};
use kiln_model::kv_cache::{CacheShape, KvCache};
use kiln_model::sampler::SamplingParams;
use kiln_model::{Config, Model};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// config.json of a randomly initialised model.
    #[arg(long)]
    config: PathBuf,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    /// New tokens per sequence (no stop token: every sequence runs to the end).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed runs (the median is reported) after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Inputs of the matrix products: f32, bf16 (mixed precision) or auto.
    #[arg(long, value_enum, default_value_t = crate::dtype_arg::DtypeArg::Auto)]
    dtype: crate::dtype_arg::DtypeArg,
}

pub fn run<B: Backend>(args: &GenerateArgs, b: &B) -> Result<()> {
    let mut model = Model::random(b, Config::load(&args.config)?, 0);
    model.set_matmul_precision(args.dtype.precision(b));
    let vocab = model.config.vocab_size;
    let mut rng = Rng::new(1);
    let requests: Vec<Request> = (0..args.batch)
        .map(|i| Request {
            prompt: (0..args.prompt).map(|_| rng.below(vocab) as i32).collect(),
            params: SamplingParams {
                temperature: 1.0,
                max_new_tokens: args.new_tokens,
                seed: i as u64,
                ..Default::default()
            },
        })
        .collect();
    let mut times = Vec::new();
    for run in 0..=args.runs {
        let t0 = Instant::now();
        let out = generate(b, &mut model, &requests, args.batch, &mut |_, _| false);
        let new: usize = out.iter().map(|g| g.tokens.len()).sum();
        anyhow::ensure!(new == args.batch * args.new_tokens, "a sequence stopped early");
        if run > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (args.batch * args.new_tokens) as f64;
    println!(
        "kiln bench generate on {}: {} sequences, prompt {}, {} new tokens each, {} threads, matrix products {:?}",
        b.device(),
        args.batch,
        args.prompt,
        args.new_tokens,
        rayon::current_num_threads(),
        model.matmul_precision()
    );
    println!("  median {:.2} s per batch, {:.0} new tokens/s", median, tokens / median);
    let precision = model.matmul_precision();
    let cached =
        KvCache::new(b, &model.config, CacheShape { slots: 1, own_len: 1, prompts: 1, prompt_len: 1 }, precision)
            .values_per_token();
    if cached > 0 {
        let bytes = 4 * precision.words(cached);
        println!("  KV cache {cached} values ({:.1} KiB) per token over all layers", bytes as f64 / 1024.0);
    }
    Ok(())
}
