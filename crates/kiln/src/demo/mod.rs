//! `kiln demo`: SFT on a tiny arithmetic model shipped in the repo, then from the SFT model a
//! preference stage (refuse toy unsafe requests, keep answering), a reward model, and GRPO
//! with an exact-match reward on questions no chat demonstrated, with a before/after table.
//! `kiln demo make-base` rebuilds that base model: tokenizer, random init, then pretraining
//! on bare equations with the same SFT recipe over `{"text"}` rows.

mod tasks;
mod tokenizer;

use crate::dtype_arg::DtypeArg;
use anyhow::{Context, Result};
use kiln_core::{Backend, Cpu, Precision};
use kiln_data::example::Encoder;
use kiln_model::generate::greedy;
use kiln_model::{Activations, Config, Model, StorageDtype};
use kiln_train::data::{encode_split, load_tokenizer};
use kiln_train::loader::pack;
use kiln_train::sft::{self, evaluate};
use kiln_train::RunConfig;
use kiln_train::{dpo, grpo, rm, Runtime};
use serde_json::json;
use std::path::{Path, PathBuf};
use tasks::{Problem, Split};

/// The base model committed in the repo.
const DEFAULT_BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/base");

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// Base model directory.
    #[arg(long, default_value = DEFAULT_BASE)]
    base: PathBuf,
    /// Where the run writes its data, metrics, plot and checkpoints.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// SFT optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// SFT peak learning rate (cosine decay to a tenth of it).
    #[arg(long, default_value_t = 1.5e-3)]
    lr: f64,
    /// Preference-stage optimizer steps.
    #[arg(long, default_value_t = 60)]
    dpo_steps: u64,
    /// Preference-stage learning rate.
    #[arg(long, default_value_t = 5e-5)]
    dpo_lr: f64,
    /// Weight of ORPO (odds ratio plus SFT on the preferred answers) beside DPO's loss.
    #[arg(long, default_value_t = 1.0)]
    orpo_weight: f64,
    /// GRPO optimizer steps.
    #[arg(long, default_value_t = 40)]
    grpo_steps: u64,
    /// GRPO learning rate.
    #[arg(long, default_value_t = 5e-5)]
    grpo_lr: f64,
    /// Seed of every stage (`train.seed`: data order, and GRPO's sampling).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The SFT stage's optimizer (`train.optimizer`): adamw, or muon for the hidden matrices.
    #[arg(long, default_value = "adamw", value_parser = ["adamw", "muon"])]
    optimizer: String,
    /// Stop after the SFT stage and print its rows of the table only.
    #[arg(long)]
    sft_only: bool,
    /// Precision of every stage's matrix products (`train.dtype`), and of scoring.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Build the demo's base model from scratch (tokenizer, init, pretraining).
    MakeBase {
        #[arg(long, default_value = DEFAULT_BASE)]
        out: PathBuf,
        /// Pretraining steps.
        #[arg(long, default_value_t = 1500)]
        steps: u64,
    },
}

const TRAIN_EXAMPLES: usize = 3000;
const HELD_OUT: usize = 200;
const PREFERENCE_PAIRS: usize = 600;

fn write_jsonl(path: &Path, rows: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    let text: String = rows.into_iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn run_config(path: &Path, toml: &str) -> Result<RunConfig> {
    std::fs::write(path, toml).with_context(|| format!("{}: cannot write", path.display()))?;
    RunConfig::load_resolved(path, &[]).map_err(anyhow::Error::msg)
}

/// A fresh directory `out/name` for a stage after SFT, with its `run.toml`.
fn stage_config(out: &Path, name: &str, toml: &str) -> Result<RunConfig> {
    let dir = out.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    run_config(&dir.join("run.toml"), toml)
}

/// The demo on `rt`'s backend (`make-base` always builds on the CPU, to stay reproducible).
pub fn run<B: Backend + Clone>(args: &Args, rt: Runtime<B>) -> Result<()> {
    match &args.action {
        Some(Action::MakeBase { out, steps }) => make_base(out, *steps),
        None => demo(args, &rt),
    }
}

/// What a model scores on the held-out problems and unsafe requests.
struct Scores {
    eval_loss: f64,
    accuracy: f64,
    samples: Vec<(String, String, String)>,
}

fn score<B: Backend>(
    b: &B,
    model_dir: &Path,
    eval_file: &Path,
    held_out: &[(Problem, usize)],
    dtype: DtypeArg,
) -> Result<Scores> {
    let mut model = Model::load(b, model_dir)?;
    model.set_matmul_precision(dtype.precision(b));
    let (tok, template) = load_tokenizer(model_dir)?;
    let template = template.context("the demo model has no chat template")?;
    let encoder = Encoder {
        tokenizer: &tok,
        template: Some(&template),
        max_seq_len: 128,
        policy: kiln_data::example::LengthPolicy::Drop,
    };
    let examples = encode_split(&[eval_file.to_path_buf()], &encoder, 0.0, "eval")?;
    let mut acts = Activations::new(b, &model.config, 16, 128, false, false);
    let eval_loss = evaluate(b, &mut model, &mut acts, &examples, &pack(&examples, 16, 128, None));

    let prompt = |messages: &[kiln_data::Message]| -> Result<Vec<i32>> {
        let text = template.render(messages, true).map_err(anyhow::Error::msg)?;
        Ok(tok.encode(&text, false).map_err(anyhow::Error::msg)?.into_iter().map(|t| t as i32).collect())
    };
    let prompts: Vec<Vec<i32>> =
        held_out.iter().map(|(p, style)| prompt(&p.chat(*style, false))).collect::<Result<_>>()?;
    let stop = tok.eos_id.map(|e| e as i32).into_iter().collect::<Vec<_>>();
    let outputs = greedy(b, &mut model, &prompts, 10, &stop);
    let mut correct = 0;
    let mut samples = Vec::new();
    for ((p, style), out) in held_out.iter().zip(&outputs) {
        let text = tok.decode(&out.iter().map(|&t| t as u32).collect::<Vec<_>>());
        if text == p.equation() {
            correct += 1;
        }
        if samples.len() < 4 {
            samples.push((p.chat(*style, false)[0].content.clone(), text, p.equation()));
        }
    }
    Ok(Scores { eval_loss, accuracy: correct as f64 / held_out.len() as f64, samples })
}

/// The demo runs in one process.
fn local() -> Runtime<Cpu> {
    Runtime { b: Cpu, world: std::sync::Arc::new(kiln_dist::Local) }
}

/// Another handle on `rt`'s backend and ranks, for the next stage.
fn again<B: Backend + Clone>(rt: &Runtime<B>) -> Runtime<B> {
    Runtime { b: rt.b.clone(), world: rt.world.clone() }
}

fn demo<B: Backend + Clone>(args: &Args, rt: &Runtime<B>) -> Result<()> {
    let b = &rt.b;
    let (out, seed) = (&args.out, args.seed);
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let base =
        std::fs::canonicalize(&args.base).with_context(|| format!("{}: base model not found", args.base.display()))?;
    let train = tasks::problems(1, TRAIN_EXAMPLES, Split::Sft);
    let held_out = tasks::problems(2, HELD_OUT, Split::HeldOut);
    write_jsonl(&out.join("train.jsonl"), train.iter().map(|(p, s)| json!({"messages": p.chat(*s, true)})))?;
    write_jsonl(&out.join("eval.jsonl"), held_out.iter().map(|(p, s)| json!({"messages": p.chat(*s, true)})))?;
    let config = run_config(
        &out.join("run.toml"),
        &format!(
            "# kiln demo: SFT of a tiny arithmetic model to answer questions in a chat.\n\
             [model]\npath = {base:?}\n\n\
             [data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\nmax_seq_len = 128\n\n\
             [train]\nlr = {:.3e}\nmin_lr = {:.3e}\nwarmup_steps = 20\nsteps = {}\nbatch_tokens = 2048\n\
             weight_decay = 0.0\nmax_grad_norm = 1.0\nseed = {seed}\neval_every = 100\ndtype = \"{}\"\n\
             optimizer = \"{}\"\n\n\
             [output]\ndir = \".\"\nsave_every = 100\nkeep_last = 1\n",
            args.lr,
            args.lr / 10.0,
            args.steps,
            args.dtype.name(),
            args.optimizer
        ),
    )?;
    let _ = std::fs::remove_dir_all(out.join("checkpoints"));

    // The preference stage's data: refuse toy unsafe requests, keep answering arithmetic.
    let prefs = tasks::preferences(3, PREFERENCE_PAIRS, Split::Sft);
    let held_out_prefs = tasks::preferences(4, HELD_OUT, Split::HeldOut);
    let pair_json = |p: &tasks::Preference| json!({"messages": p.prompt, "chosen": p.chosen, "rejected": p.rejected});
    write_jsonl(&out.join("preferences.jsonl"), prefs.iter().map(pair_json))?;
    write_jsonl(&out.join("preferences_eval.jsonl"), held_out_prefs.iter().map(pair_json))?;
    // The RL stage's data: questions with checkable answers, and the held-out ones to watch.
    let rl_prompts = tasks::rl_prompts();
    let prompt_json =
        |(p, s): &(Problem, usize)| json!({"messages": p.chat(*s, false), "answer": p.answer().to_string()});
    write_jsonl(&out.join("rl_prompts.jsonl"), rl_prompts.iter().map(prompt_json))?;
    write_jsonl(&out.join("rl_eval.jsonl"), held_out.iter().map(prompt_json))?;

    let products = match args.dtype.precision(b) {
        Precision::Bf16 => "bf16 mixed precision",
        Precision::F32 => "f32",
    };
    println!(
        "kiln demo: SFT of {} on {TRAIN_EXAMPLES} chat examples, {HELD_OUT} held out, in {products} on {}",
        base.display(),
        b.device()
    );
    let before = score(b, &base, &out.join("eval.jsonl"), &held_out, args.dtype)?;
    let summary = sft::run(again(rt), &config, None, false)?;
    let after = score(b, &summary.checkpoint, &out.join("eval.jsonl"), &held_out, args.dtype)?;

    if args.sft_only {
        println!();
        print_sft_rows(&before, &after, summary.steps, None);
        return Ok(());
    }
    let sft_model = std::fs::canonicalize(&summary.checkpoint)?;

    println!("kiln demo: preference stage (DPO + ORPO) on {PREFERENCE_PAIRS} pairs: refuse toy unsafe requests, keep answering");
    let dpo_config = stage_config(
        out,
        "dpo",
        &format!(
            "# kiln demo: preference optimisation of the SFT model.\n\
             [model]\npath = {:?}\n\n\
             [data]\ntrain = \"../preferences.jsonl\"\neval = \"../preferences_eval.jsonl\"\nmax_seq_len = 128\n\n\
             [train]\nlr = {}\nwarmup_steps = 5\nsteps = {}\nbatch_tokens = 2048\nseed = {seed}\neval_every = 20\ndtype = \"{}\"\n\n\
             [dpo]\nloss = [\"sigmoid\", \"orpo\"]\nloss_weights = [1.0, {}]\nbeta = 0.1\n\n\
             [output]\ndir = \".\"\nkeep_last = 1\n",
            sft_model,
            args.dpo_lr,
            args.dpo_steps,
            args.dtype.name(),
            args.orpo_weight
        ),
    )?;
    let dpo_summary = dpo::run(again(rt), &dpo_config, None, false)?;

    println!("kiln demo: reward model from the SFT model on the same pairs");
    let rm_config = stage_config(
        out,
        "rm",
        &format!(
            "# kiln demo: a reward model (Bradley-Terry) trained from the SFT model.\n\
             [model]\npath = {:?}\n\n\
             [data]\ntrain = \"../preferences.jsonl\"\neval = \"../preferences_eval.jsonl\"\nmax_seq_len = 128\n\n\
             [train]\nlr = 1e-4\nwarmup_steps = 5\nsteps = {}\nbatch_tokens = 2048\nseed = {seed}\neval_every = 20\ndtype = \"{}\"\n\n\
             [rm]\ncenter_rewards_coefficient = 0.01\n\n\
             [output]\ndir = \".\"\nkeep_last = 1\n",
            sft_model,
            args.dpo_steps,
            args.dtype.name()
        ),
    )?;
    let rm_summary = rm::run(again(rt), &rm_config, None, false)?;

    println!(
        "kiln demo: GRPO from the SFT model on {} questions never demonstrated in a chat, exact-match reward",
        rl_prompts.len()
    );
    let grpo_config = stage_config(
        out,
        "grpo",
        &format!(
            "# kiln demo: RL with a verifiable reward (Dr. GRPO) from the SFT model.\n\
             [model]\npath = {sft_model:?}\n\n\
             [data]\ntrain = \"../rl_prompts.jsonl\"\neval = \"../rl_eval.jsonl\"\nmax_seq_len = 64\n\n\
             [train]\nlr = {}\nwarmup_steps = 3\nsteps = {}\nbatch_tokens = 64\nseed = {seed}\neval_every = 10\ndtype = \"{}\"\n\n\
             [grpo]\ngroup_size = 8\nprompts_per_step = 16\nmax_new_tokens = 10\ntemperature = 1.0\n\
             loss_type = \"dr_grpo\"\nscale_rewards = \"none\"\n\n\
             [[grpo.rewards]]\ntype = \"exact_match\"\npattern = '=(\\d+)$'\n\n\
             [output]\ndir = \".\"\nkeep_last = 1\n",
            args.grpo_lr,
            args.grpo_steps,
            args.dtype.name()
        ),
    )?;
    let grpo_summary = grpo::run(again(rt), &grpo_config, None, false)?;
    let aligned = score(b, &dpo_summary.checkpoint, &out.join("eval.jsonl"), &held_out, args.dtype)?;
    let reinforced = score(b, &grpo_summary.checkpoint, &out.join("eval.jsonl"), &held_out, args.dtype)?;

    println!();
    print_sft_rows(&before, &after, summary.steps, dpo_summary.eval_before);
    println!(
        "| after DPO + ORPO ({} steps) | {:.3} | {:.1}% | {} |",
        dpo_summary.steps,
        aligned.eval_loss,
        100.0 * aligned.accuracy,
        prefers(dpo_summary.eval)
    );
    let rm_acc = |s: Option<rm::RmStats>| s.map_or("-".to_string(), |s| format!("{:.1}%", 100.0 * s.accuracy));
    println!(
        "| reward model ({} steps from the SFT model) | | | {} before training, {} after |",
        rm_summary.steps,
        rm_acc(rm_summary.eval_before),
        rm_acc(rm_summary.eval)
    );
    println!(
        "| after GRPO ({} steps from the SFT model) | {:.3} | {:.1}% | - |",
        grpo_summary.steps,
        reinforced.eval_loss,
        100.0 * reinforced.accuracy
    );
    println!();
    let curve = kiln_train::metrics::series(&out.join("grpo").join("metrics.jsonl"), "eval_solved")?;
    let curve: Vec<String> = curve.iter().map(|(step, solved)| format!("{step}: {:.1}%", 100.0 * solved)).collect();
    println!("GRPO, held-out answers right (greedy) by step: {}", curve.join(", "));
    println!();
    let columns = before.samples.iter().zip(&after.samples).zip(&aligned.samples).zip(&reinforced.samples);
    for ((((q, b, want), (_, a, _)), (_, d, _)), (_, g, _)) in columns {
        println!("  {q:<24} base: {b:<14?} sft: {a:<12?} dpo: {d:<12?} grpo: {g:<12?} expected: {want}");
    }
    println!();
    println!(
        "SFT: {} steps in {:.0} s ({:.0} tokens/s); DPO: {} steps in {:.0} s ({:.0} tokens/s); \
         GRPO: {} steps in {:.0} s ({:.0} trained tokens/s)",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        dpo_summary.steps,
        dpo_summary.seconds,
        dpo_summary.tokens_per_s,
        grpo_summary.steps,
        grpo_summary.seconds,
        grpo_summary.tokens_per_s
    );
    println!("checkpoints and plots:");
    for (checkpoint, plot) in [
        (&summary.checkpoint, &summary.plot),
        (&dpo_summary.checkpoint, &dpo_summary.plot),
        (&rm_summary.checkpoint, &rm_summary.plot),
        (&grpo_summary.checkpoint, &grpo_summary.plot),
    ] {
        println!("  {}  {}", checkpoint.display(), plot.display());
    }
    Ok(())
}

/// The table's head and its rows for the base and the SFT model.
fn print_sft_rows(before: &Scores, after: &Scores, steps: u64, prefers_chosen: Option<dpo::PairStats>) {
    println!(
        "| model | held-out eval loss | exact match ({HELD_OUT} questions) | prefers the chosen answer ({HELD_OUT} held-out pairs) |"
    );
    println!("| --- | ---: | ---: | ---: |");
    println!("| base | {:.3} | {:.1}% | - |", before.eval_loss, 100.0 * before.accuracy);
    println!(
        "| after SFT ({steps} steps) | {:.3} | {:.1}% | {} |",
        after.eval_loss,
        100.0 * after.accuracy,
        prefers(prefers_chosen)
    );
}

/// The share of held-out pairs whose chosen answer the model prefers, or "-".
fn prefers(stats: Option<dpo::PairStats>) -> String {
    stats.map_or("-".to_string(), |s| format!("{:.1}%", 100.0 * s.prefers_chosen))
}

fn make_base(out: &Path, steps: u64) -> Result<()> {
    let work = out.with_extension("pretrain");
    let _ = std::fs::remove_dir_all(&work);
    let init = work.join("init");
    std::fs::create_dir_all(&init)?;
    let config_json = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer::vocab_size(),
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "bos_token_id": null,
        "eos_token_id": 2,
        "pad_token_id": 0,
    });
    write_json(&init.join("config.json"), &config_json)?;
    write_json(&init.join("tokenizer.json"), &tokenizer::tokenizer_json())?;
    write_json(&init.join("tokenizer_config.json"), &tokenizer::tokenizer_config_json())?;
    write_json(&init.join("generation_config.json"), &json!({"eos_token_id": 2, "pad_token_id": 0}))?;
    let config = Config::load(&init)?;
    Model::random(&Cpu, config, 0).save_weights(&Cpu, &init)?;
    write_jsonl(
        &work.join("text.jsonl"),
        tasks::pretraining_text(3, 20_000, 120).into_iter().map(|t| json!({"text": t})),
    )?;
    let run = run_config(
        &work.join("run.toml"),
        &format!(
            "[model]\npath = \"init\"\n[data]\ntrain = \"text.jsonl\"\nmax_seq_len = 128\n\
             [train]\nlr = 3e-3\nmin_lr = 3e-4\nwarmup_steps = 50\nsteps = {steps}\nbatch_tokens = 4096\n\
             weight_decay = 0.01\nseed = 0\n[output]\ndir = \".\"\nsave_every = 500\nkeep_last = 1\n"
        ),
    )?;
    let summary = sft::run(local(), &run, None, false)?;
    // The base ships in bf16, like most published checkpoints, and loads as any HF model.
    let mut model = Model::load(&Cpu, &summary.checkpoint)?;
    model.dtype = StorageDtype::BF16;
    std::fs::create_dir_all(out)?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(init.join(f), out.join(f))?;
    }
    model.save_weights(&Cpu, out)?;
    println!("base model written to {} (final pretraining loss {:.4})", out.display(), summary.last.loss);
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
