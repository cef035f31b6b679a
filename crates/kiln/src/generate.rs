//! `kiln generate --model DIR`: chat with a model (the chat template applied), or with
//! `--prompts FILE.jsonl` generate for every row (`{"prompt": "..."}` or `{"messages": [..]}`)
//! and write `{"completion", "tokens", "finish"}` lines.

use anyhow::{Context, Result};
use kiln_core::Backend;
use kiln_data::prompts::read_prompts;
use kiln_data::{Message, Tokenizer};
use kiln_model::generator::{generate, FinishReason, Generation, Request};
use kiln_model::sampler::SamplingParams;
use kiln_model::Model;
use kiln_train::data::load_tokenizer;
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// JSONL of prompts for batch mode; without it, an interactive chat on stdin.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Batch mode output (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Text that ends a completion (repeatable; not included in the output).
    #[arg(long = "stop")]
    stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Inputs of the matrix products: f32, bf16 (mixed precision) or auto.
    #[arg(long, value_enum, default_value_t = crate::dtype_arg::DtypeArg::Auto)]
    dtype: crate::dtype_arg::DtypeArg,
}

impl Args {
    fn params(&self, tokenizer: &Tokenizer, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            max_new_tokens: self.max_new_tokens,
            stop_ids: tokenizer.eos_id.map(|e| e as i32).into_iter().collect(),
            seed,
        }
    }
}

/// The completion's text, cut at the first stop string.
fn text_of(tokenizer: &Tokenizer, g: &Generation, stop: &[String]) -> String {
    let text = tokenizer.decode(&g.tokens.iter().map(|&t| t as u32).collect::<Vec<_>>());
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

pub fn run<B: Backend>(args: &Args, b: &B) -> Result<()> {
    let mut model = Model::load(b, &args.model)?;
    model.set_matmul_precision(args.dtype.precision(b));
    eprintln!("{}", kiln_train::config::describe_precision(b, model.matmul_precision()));
    let (tokenizer, template) = load_tokenizer(&args.model)?;
    let stops_in = |tokens: &[i32]| {
        let text = tokenizer.decode(&tokens.iter().map(|&t| t as u32).collect::<Vec<_>>());
        args.stop.iter().any(|s| text.contains(s.as_str()))
    };
    if let Some(file) = &args.prompts {
        let prompts = read_prompts(std::slice::from_ref(file), &tokenizer, template.as_ref())?;
        let requests: Vec<Request> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Request {
                prompt: p.ids.clone(),
                params: args.params(&tokenizer, args.seed.wrapping_add(i as u64)),
            })
            .collect();
        let outputs = generate(b, &mut model, &requests, args.batch, &mut |_, tokens| stops_in(tokens));
        let mut out: Box<dyn Write> = match &args.output {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?,
            )),
            None => Box::new(std::io::stdout().lock()),
        };
        for g in &outputs {
            let finish = if g.finish == FinishReason::Stop { "stop" } else { "length" };
            let line = serde_json::json!({"completion": text_of(&tokenizer, g, &args.stop), "tokens": g.tokens.len(), "finish": finish});
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let template = template.context("interactive chat needs the model's chat template (or pass --prompts)")?;
    let mut messages: Vec<Message> = Vec::new();
    eprintln!("kiln chat with {} (empty line or EOF to quit)", args.model.display());
    let stdin = std::io::stdin();
    for (turn, line) in stdin.lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            break;
        }
        messages.push(Message { role: "user".into(), content: line });
        let text = template.render(&messages, true).map_err(anyhow::Error::msg)?;
        let prompt =
            tokenizer.encode(&text, false).map_err(anyhow::Error::msg)?.into_iter().map(|t| t as i32).collect();
        let request = Request { prompt, params: args.params(&tokenizer, args.seed.wrapping_add(turn as u64)) };
        let g = generate(b, &mut model, &[request], 1, &mut |_, tokens| stops_in(tokens)).remove(0);
        let answer = text_of(&tokenizer, &g, &args.stop);
        println!("{answer}");
        messages.push(Message { role: "assistant".into(), content: answer });
    }
    Ok(())
}
