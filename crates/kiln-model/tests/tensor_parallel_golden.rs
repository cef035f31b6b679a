//! Tensor parallel (with its vocabulary-parallel embedding, head and loss) against
//! transformers: each rank of an in-process group holds and checks its blocks.

use kiln_core::Cpu;
use kiln_dist::Threads;
use std::sync::Arc;
use std::time::Duration;

fn check_on_ranks(case: &str, t: usize, sequence_parallel: bool) {
    std::thread::scope(|s| {
        let ranks: Vec<_> = Threads::new(t, Duration::from_secs(60))
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    kiln_model::golden::check_tensor_parallel(&Cpu, case, Arc::new(comm), sequence_parallel)
                })
            })
            .collect();
        for rank in ranks {
            rank.join().expect("a rank failed its check");
        }
    });
}

#[test]
fn llama_over_two_ranks_matches_transformers_block_by_block() {
    check_on_ranks("llama", 2, false);
}

#[test]
fn llama_with_sequence_parallel_over_two_ranks_matches_transformers() {
    check_on_ranks("llama", 2, true);
}

#[test]
fn deepseek_v3_over_two_ranks_matches_transformers_block_by_block() {
    check_on_ranks("deepseek_v3", 2, false);
}

#[test]
fn deepseek_v3_with_sequence_parallel_over_two_ranks_matches_transformers() {
    check_on_ranks("deepseek_v3", 2, true);
}

#[test]
fn deepseek_v4_over_two_ranks_matches_transformers_block_by_block() {
    // Compressed sparse and heavily compressed layers, and a hash-routed one; four streams.
    check_on_ranks("deepseek_v4", 2, false);
    check_on_ranks("deepseek_v4_hc4", 2, false);
}

#[test]
fn deepseek_v4_with_sequence_parallel_over_two_ranks_matches_transformers() {
    // The hyper-connected streams cut by tokens, their mixes' gradients summed over the group.
    check_on_ranks("deepseek_v4", 2, true);
    check_on_ranks("deepseek_v4_hc4", 2, true);
}
