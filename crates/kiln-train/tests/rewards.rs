//! The reward functions of `kiln grpo`: final answers compared as numbers or text, regex
//! format and length rules, and reward programs and HTTP endpoints, whose failures (a crash,
//! a timeout, a malformed answer, a refused connection) are errors naming the reward.

use kiln_core::Cpu;
use kiln_train::rewards::{External, Reward, RewardFn, Sample};
use regex::Regex;
use std::io::{Read, Write};
use std::time::Duration;

fn sample<'a>(completion: &'a str, answer: &'a str) -> Sample<'a> {
    Sample { prompt: "p", completion, answer: Some(answer), columns: None }
}

#[test]
fn exact_match_reads_the_last_boxed_answer_and_compares_numbers() {
    let r: Reward<Cpu> = Reward { name: "em".into(), weight: 1.0, function: RewardFn::ExactMatch { pattern: None } };
    let samples = [
        sample("so \\boxed{3} no wait \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        sample("\\boxed{0.50}", "1/2"),
        sample("\\boxed{1,000}", "1000"),
        sample("the answer is 7", "7"),
        sample("\\boxed{8}", "7"),
    ];
    assert_eq!(r.score(&Cpu, &samples).unwrap(), vec![1.0, 1.0, 1.0, 0.0, 0.0]);
    let re: Reward<Cpu> = Reward {
        name: "em".into(),
        weight: 1.0,
        function: RewardFn::ExactMatch { pattern: Some(Regex::new(r"=\s*(-?\d+)").unwrap()) },
    };
    assert_eq!(re.score(&Cpu, &[sample("3+4=7", "7"), sample("3+4=8", "7")]).unwrap(), vec![1.0, 0.0]);
}

#[test]
fn format_and_length_rewards() {
    let f: Reward<Cpu> = Reward {
        name: "format".into(),
        weight: 1.0,
        function: RewardFn::Format { pattern: Regex::new(r"(?s)^<think>.*</think>.+$").unwrap() },
    };
    assert_eq!(f.score(&Cpu, &[sample("<think>x</think>7", ""), sample("7", "")]).unwrap(), vec![1.0, 0.0]);
    let l: Reward<Cpu> = Reward { name: "len".into(), weight: 1.0, function: RewardFn::Length { max_chars: 4 } };
    assert_eq!(l.score(&Cpu, &[sample("abc", ""), sample("abcdef", "")]).unwrap(), vec![0.0, -0.5]);
}

fn command(script: &str, timeout_ms: u64) -> Reward<Cpu> {
    Reward {
        name: "ext".into(),
        weight: 1.0,
        function: RewardFn::External(External::Command {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout: Duration::from_millis(timeout_ms),
        }),
    }
}

#[test]
fn command_rewards_read_json_lines_and_fail_clearly() {
    let samples = [sample("a", "1"), sample("bb", "2")];
    // One reward per line: the length of each JSON line, to show the input arrived.
    let ok = command("while read -r l; do echo ${#l}; done", 5000).score(&Cpu, &samples).unwrap();
    assert_eq!(ok.len(), 2);
    assert!(ok[1] == ok[0] + 1.0, "{ok:?}");
    let err = command("sleep 5", 200).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("reward `ext`") && err.contains("timed out"), "{err}");
    let err = command("echo boom >&2; exit 3", 5000).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("exited") && err.contains("boom"), "{err}");
    let err = command("cat > /dev/null; echo 1", 5000).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("wrote 1 rewards for 2 samples"), "{err}");
}

/// A one-request HTTP server on loopback: reads a request, waits `delay`, answers with
/// `status` and the body `answer(request body)`. Returns its URL.
fn serve_once(status: u16, delay: Duration, answer: fn(&serde_json::Value) -> String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/reward", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        let body = loop {
            let n = stream.read(&mut buf).unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break serde_json::from_slice(&request[end + 4..end + 4 + length]).unwrap();
                }
            }
            if n == 0 {
                return;
            }
        };
        std::thread::sleep(delay);
        let out = answer(&body);
        let _ =
            write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}", out.len());
    });
    url
}

fn http(url: String, timeout_ms: u64) -> Reward<Cpu> {
    Reward {
        name: "sandbox".into(),
        weight: 1.0,
        function: RewardFn::External(External::Http { url, timeout: Duration::from_millis(timeout_ms) }),
    }
}

#[test]
fn http_rewards_post_the_samples_and_fail_clearly() {
    let samples = [sample("a", "1"), sample("bbb", "2")];
    // The reward of each sample: its completion's length, to show what arrived.
    let lengths = |body: &serde_json::Value| {
        let lens: Vec<usize> =
            body["samples"].as_array().unwrap().iter().map(|s| s["completion"].as_str().unwrap().len()).collect();
        serde_json::json!({ "rewards": lens }).to_string()
    };
    let url = serve_once(200, Duration::ZERO, lengths);
    assert_eq!(http(url, 5000).score(&Cpu, &samples).unwrap(), vec![1.0, 3.0]);

    let url = serve_once(200, Duration::from_millis(1500), lengths);
    let err = http(url, 200).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("reward `sandbox`") && err.contains("no answer within 0.2 s"), "{err}");
    let url = serve_once(500, Duration::ZERO, |_| "sandbox crashed".into());
    let err = http(url, 5000).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("status 500") && err.contains("sandbox crashed"), "{err}");
    let url = serve_once(200, Duration::ZERO, |_| r#"{"rewards": [1]}"#.into());
    let err = http(url, 5000).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("answered 1 rewards for 2 samples"), "{err}");
    // Nothing listens on the port of a listener that was dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = http(format!("http://127.0.0.1:{port}/"), 5000).score(&Cpu, &samples).unwrap_err().to_string();
    assert!(err.contains("reward `sandbox`: POST"), "{err}");
}
