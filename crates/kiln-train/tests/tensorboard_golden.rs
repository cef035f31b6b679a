//! kiln's TensorBoard events against a file PyTorch's `SummaryWriter` wrote (fixture by
//! `tools/golden/tfevents.py`): the reader decodes PyTorch's file to the scalars it was given,
//! and kiln's writer, given the same resume point and metrics, writes the same events.

use kiln_train::tensorboard::{read_events, Event, EventKind, EventWriter};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tensorboard")
}

/// Events without their wall times.
fn timeless(events: Vec<Event>) -> Vec<(u64, EventKind)> {
    events.into_iter().map(|e| (e.step, e.kind)).collect()
}

#[test]
fn events_equal_pytorchs_summary_writer() {
    let golden = read_events(&fixture().join("events.out.tfevents.golden")).unwrap();
    assert!(golden.iter().all(|e| e.wall_time > 1.7e9), "wall times are seconds since 1970");
    let scalars: Vec<(String, u64, f64)> =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("scalars.json")).unwrap()).unwrap();
    let from_pytorch = timeless(golden);
    let written: Vec<(u64, EventKind)> = scalars
        .iter()
        .map(|(tag, step, value)| (*step, EventKind::Scalars(vec![(tag.clone(), *value as f32)])))
        .collect();
    assert_eq!(from_pytorch[3..], written[..], "the reader decodes PyTorch's scalars");

    // kiln's writer, resumed after step 3, given the same metrics as kiln records them.
    let dir = std::env::temp_dir().join(format!("kiln-tfevents-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = EventWriter::create(&dir, Some(4)).unwrap();
    w.write_record(&serde_json::json!({"step": 4, "loss": 1.5, "learning_rate": 1e-3})).unwrap();
    w.write_record(&serde_json::json!({"step": 4, "eval_loss": 2.25})).unwrap();
    w.write_record(&serde_json::json!({"step": 5, "loss": -0.375, "note": "not a number"})).unwrap();
    drop(w);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    assert_eq!(timeless(read_events(&files[0]).unwrap()), from_pytorch, "kiln writes what PyTorch writes");
}

#[test]
fn a_corrupted_record_is_refused() {
    let mut bytes = std::fs::read(fixture().join("events.out.tfevents.golden")).unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-tfevents-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events.out.tfevents.bad");
    let last = bytes.len() - 6;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = read_events(&path).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
}
