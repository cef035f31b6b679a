//! TensorBoard event files (`events.out.tfevents.*`): each metric as a scalar, named as HF's
//! TensorBoardCallback names it (`train/<key>`, `eval/<key>` for `eval_<key>`), so
//! `tensorboard --logdir runs/` shows kiln runs beside TRL's.
//!
//! A file is a sequence of records, each
//!   u64 length (LE) · u32 masked_crc32c(length bytes) · data · u32 masked_crc32c(data)
//! with masked_crc(x) = rotr(crc32c(x), 15) + 0xa282ead8, and the data a protobuf `Event`:
//!   Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
//!                Summary summary = 5; SessionLog session_log = 7; }
//!   Summary    { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
//!   SessionLog { enum status = 1 (START = 1); }
//! Only these fields are written, by hand: three small messages did not justify a protobuf
//! code generator. A resumed run opens a new file that starts, as PyTorch's
//! `SummaryWriter(purge_step=N)` does, with a `file_version` and a `SessionLog START` at the
//! first step it will log, so TensorBoard drops what the interrupted attempt logged from there.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_VERSION: &str = "brain.Event:2";
const SESSION_START: u64 = 1;

/// Protobuf wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

fn masked_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, field << 3 | wire);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries besides its time and step.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    FileVersion(String),
    SessionStart,
    /// `(tag, value)` pairs of one summary.
    Scalars(Vec<(String, f32)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: u64,
    pub kind: EventKind,
}

impl Event {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        key(&mut out, 1, FIXED64);
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        if self.step != 0 {
            key(&mut out, 2, VARINT);
            varint(&mut out, self.step);
        }
        match &self.kind {
            EventKind::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
            EventKind::SessionStart => {
                let mut log = Vec::new();
                key(&mut log, 1, VARINT);
                varint(&mut log, SESSION_START);
                bytes_field(&mut out, 7, &log);
            }
            EventKind::Scalars(values) => {
                let mut summary = Vec::new();
                for (tag, value) in values {
                    let mut v = Vec::new();
                    bytes_field(&mut v, 1, tag.as_bytes());
                    key(&mut v, 2, FIXED32);
                    v.extend_from_slice(&value.to_le_bytes());
                    bytes_field(&mut summary, 1, &v);
                }
                bytes_field(&mut out, 5, &summary);
            }
        }
        out
    }
}

/// The tag HF's TensorBoardCallback gives metric `key`.
fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir`; `first_step` is where a resumed run takes up again.
    pub fn create(dir: &Path, first_step: Option<u64>) -> Result<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = match host.trim() {
            "" => "localhost",
            h => h,
        };
        let wall = now();
        let name = format!("events.out.tfevents.{}.{host}.{}.0", wall as u64, std::process::id());
        let path = dir.join(name);
        let file = std::fs::File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = Self { path, file };
        w.write(&Event { wall_time: wall, step: 0, kind: EventKind::FileVersion(FILE_VERSION.into()) })?;
        if let Some(step) = first_step {
            w.write(&Event { wall_time: wall, step, kind: EventKind::FileVersion(FILE_VERSION.into()) })?;
            w.write(&Event { wall_time: wall, step, kind: EventKind::SessionStart })?;
        }
        Ok(w)
    }

    /// Appends one event as a record (one write, so a crash leaves whole records or a torn
    /// last one, which TensorBoard skips).
    pub fn write(&mut self, event: &Event) -> Result<()> {
        let data = event.encode();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&record).with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Every number in a metrics record but its `step`, one event per scalar (as HF's callback
    /// writes them), at the record's step.
    pub fn write_record(&mut self, record: &Value) -> Result<()> {
        let Some(fields) = record.as_object() else { return Ok(()) };
        let step = fields.get("step").and_then(Value::as_u64).unwrap_or(0);
        let wall_time = now();
        for (k, v) in fields {
            if let (true, Some(x)) = (k != "step", v.as_f64()) {
                let kind = EventKind::Scalars(vec![(tag(k), x as f32)]);
                self.write(&Event { wall_time, step, kind })?;
            }
        }
        Ok(())
    }
}

/// A little-endian fixed-width field at `at`, or an error naming the file.
fn fixed<const N: usize>(bytes: &[u8], at: usize, path: &Path) -> Result<[u8; N]> {
    match bytes.get(at..at + N) {
        Some(b) => Ok(b.try_into().expect("N bytes")),
        None => bail!("{}: truncated at byte {at}", path.display()),
    }
}

/// One protobuf field: its number, and its value (varint or fixed) or bytes (length-delimited).
struct Field<'a> {
    number: u64,
    value: u64,
    bytes: &'a [u8],
}

fn read_varint(msg: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *msg.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The fields of `msg`, or None where it is not protobuf.
fn fields(msg: &[u8]) -> Option<Vec<Field<'_>>> {
    let (mut at, mut out) = (0, Vec::new());
    while at < msg.len() {
        let k = read_varint(msg, &mut at)?;
        let (number, wire) = (k >> 3, k & 7);
        let mut fixed = |n: usize| -> Option<u64> {
            let b = msg.get(at..at + n)?;
            at += n;
            Some(b.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
        };
        let (value, bytes) = match wire {
            FIXED64 => (fixed(8)?, &msg[..0]),
            FIXED32 => (fixed(4)?, &msg[..0]),
            VARINT => (read_varint(msg, &mut at)?, &msg[..0]),
            LEN => {
                let n = read_varint(msg, &mut at)? as usize;
                at += n;
                (0, msg.get(at - n..at)?)
            }
            _ => return None,
        };
        out.push(Field { number, value, bytes });
    }
    Some(out)
}

fn decode(data: &[u8]) -> Option<Event> {
    let (mut wall_time, mut step, mut kind) = (0.0, 0, None);
    for f in fields(data)? {
        match f.number {
            1 => wall_time = f64::from_bits(f.value),
            2 => step = f.value,
            3 => kind = Some(EventKind::FileVersion(String::from_utf8(f.bytes.to_vec()).ok()?)),
            5 => {
                let mut values = Vec::new();
                for v in fields(f.bytes)?.into_iter().filter(|v| v.number == 1) {
                    let (mut tag, mut x) = (String::new(), None);
                    for g in fields(v.bytes)? {
                        match g.number {
                            1 => tag = String::from_utf8(g.bytes.to_vec()).ok()?,
                            2 => x = Some(f32::from_bits(g.value as u32)),
                            _ => {}
                        }
                    }
                    values.push((tag, x?));
                }
                kind = Some(EventKind::Scalars(values));
            }
            7 => {
                let status = fields(f.bytes)?.into_iter().find(|g| g.number == 1).map_or(0, |g| g.value);
                kind = (status == SESSION_START).then_some(EventKind::SessionStart);
            }
            _ => {}
        }
    }
    Some(Event { wall_time, step, kind: kind? })
}

/// The events of a file, every record's checksums verified; events of kinds kiln does not
/// write (graphs, histograms...) are an error, so a reader test cannot pass by skipping.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (mut at, mut events) = (0, Vec::new());
    while at < bytes.len() {
        let len = fixed::<8>(&bytes, at, path)?;
        if u32::from_le_bytes(fixed::<4>(&bytes, at + 8, path)?) != masked_crc(&len) {
            bail!("{}: record at byte {at}: length checksum mismatch", path.display());
        }
        let n = u64::from_le_bytes(len) as usize;
        let data = bytes.get(at + 12..at + 12 + n).with_context(|| format!("{}: truncated record", path.display()))?;
        if u32::from_le_bytes(fixed::<4>(&bytes, at + 12 + n, path)?) != masked_crc(data) {
            bail!("{}: record at byte {at}: data checksum mismatch", path.display());
        }
        events.push(decode(data).with_context(|| format!("{}: record at byte {at}: not an event", path.display()))?);
        at += 16 + n;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_of_the_empty_string_and_a_known_vector() {
        // CRC-32C("123456789") = 0xe3069283 (RFC 3720); masked as TensorFlow masks it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn tags_follow_hf() {
        assert_eq!(tag("loss"), "train/loss");
        assert_eq!(tag("eval_loss"), "eval/loss");
        assert_eq!(tag("rewards/chosen"), "train/rewards/chosen");
    }
}
