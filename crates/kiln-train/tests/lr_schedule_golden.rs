//! Every learning-rate schedule against transformers' `get_scheduler` as the Trainer steps it
//! (`tools/golden/lr_schedules.py`), and the warm-up a ratio gives.

use kiln_train::schedule::{Schedule, ScheduleKind};
use kiln_train::RunConfig;
use safetensors::SafeTensors;

#[test]
fn schedules_match_transformers() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/schedule/lr.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f64s = |n: &str| -> Vec<f64> {
        st.tensor(n).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let p = f64s("params");
    for (name, kind) in [
        ("constant", ScheduleKind::Constant),
        ("constant_with_warmup", ScheduleKind::ConstantWithWarmup),
        ("linear", ScheduleKind::Linear),
        ("cosine", ScheduleKind::Cosine),
        ("cosine_with_min_lr", ScheduleKind::CosineWithMinLr),
    ] {
        let s = Schedule {
            kind,
            lr: p[0] as f32,
            min_lr: p[1] as f32,
            warmup_steps: p[2] as u64,
            total_steps: p[3] as u64,
        };
        for (done, want) in f64s(name).into_iter().enumerate() {
            let got = s.lr(done as u64) as f64;
            assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "{name} after {done} steps: {got} vs {want}");
        }
    }
    let warmup = i64::from_le_bytes(st.tensor("warmup_of_ratio_0.25_over_10").unwrap().data().try_into().unwrap());
    let config = RunConfig::parse(
        "[model]\npath = \"m\"\n[data]\ntrain = \"t\"\nmax_seq_len = 8\n[train]\nlr = 1e-3\nsteps = 10\n\
         batch_tokens = 8\nwarmup_ratio = 0.25\nlr_schedule = \"linear\"\n[output]\ndir = \"o\"\n",
        &[],
    )
    .unwrap();
    let s = Schedule::for_run(&config.train, 10);
    assert_eq!((s.warmup_steps as i64, s.kind), (warmup, ScheduleKind::Linear));
}
