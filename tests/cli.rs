//! The `jamba` command line, end to end.

mod common;

use std::process::Command;

use common::*;
use jamba::checkpoint::{read_all, write_safetensors};

fn jamba() -> Command {
    Command::new(env!("CARGO_BIN_EXE_jamba"))
}

fn forward_matches(backend: &str, tol: f32) {
    for case in CASES {
        let exp = expected(case);
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.safetensors");
        let output = dir.path().join("logits.safetensors");
        let mut tensors = vec![("input_ids".to_string(), exp["input_ids"].clone())];
        if exp["attention_mask"]
            .clone()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()
            .contains(&0)
        {
            tensors.push(("attention_mask".into(), exp["attention_mask"].clone()));
        }
        write_safetensors(&input, tensors, None).unwrap();
        let status = jamba()
            .args(["forward", "--model"])
            .arg(fixture_dir(case))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--backend", backend])
            .status()
            .unwrap();
        assert!(status.success(), "{case}: jamba forward failed");
        let out = read_all(&output).unwrap();
        let logits = out["logits"].clone().to_vec::<f32>().unwrap();
        assert_eq!(out["logits"].shape, exp["logits"].shape);
        assert_close(
            &format!("{case} jamba forward --backend {backend} logits"),
            &logits,
            &exp["logits"],
            tol,
        );
    }
}

#[test]
fn forward_reproduces_transformers_logits() {
    forward_matches("ndarray", 1e-4);
}

#[cfg(feature = "wgpu")]
#[test]
fn forward_on_wgpu_reproduces_transformers_logits() {
    forward_matches("wgpu", 1e-3);
}

#[test]
fn info_reports_the_papers_kv_cache() {
    let out = jamba()
        .args(["info", "--preset", "jamba-v0.1", "--context", "262144"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("KV cache at 262144 tokens x 1: 4.00 GiB"),
        "{text}"
    );
    assert!(text.contains("51.5") || text.contains("51.6"), "{text}");
    assert!(
        text.contains("layers   0-7   M M* M M* A M* M M*"),
        "{text}"
    );
}

#[test]
fn info_reads_a_checkpoint_config() {
    let out = jamba()
        .args(["info", "--model"])
        .arg(fixture_dir("tiny-b"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("M* A* M* A*"), "{text}");
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.safetensors");
    let ids = burn::tensor::TensorData::new(vec![1i64, 2, 9999], [1, 3]);
    write_safetensors(&input, vec![("input_ids".into(), ids)], None).unwrap();
    let out = jamba()
        .args(["forward", "--model"])
        .arg(fixture_dir("tiny-b"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("token id 9999 at position 2"), "{err}");
    assert!(!dir.path().join("o.safetensors").exists());

    let out = jamba()
        .args(["info", "--preset", "jamba-9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("unknown preset"));
}

#[test]
fn loss_reproduces_transformers_gradients() {
    for case in CASES {
        let exp = expected(case);
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.safetensors");
        let output = dir.path().join("grads.safetensors");
        let tensors = vec![
            ("input_ids".to_string(), exp["input_ids"].clone()),
            ("attention_mask".to_string(), exp["attention_mask"].clone()),
        ];
        write_safetensors(&input, tensors, None).unwrap();
        let status = jamba()
            .args(["loss", "--model"])
            .arg(fixture_dir(case))
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .status()
            .unwrap();
        assert!(status.success(), "{case}: jamba loss failed");
        let got = read_all(&output).unwrap();
        assert_close(
            &format!("{case} loss"),
            &got["loss"].to_vec::<f32>().unwrap(),
            &exp["loss"],
            1e-4,
        );
        assert_close(
            &format!("{case} aux_loss"),
            &got["aux_loss"].to_vec::<f32>().unwrap(),
            &exp["aux_loss"],
            1e-4,
        );
        let ours = got
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n.to_string(), v.clone())))
            .collect();
        assert_grads_match(case, &ours, &exp, 1e-4);
    }
}

#[test]
fn generate_spread_over_devices_gives_the_same_text() {
    // `--devices 3` runs the expert-parallel placement (on the one CPU of ndarray): greedy text of
    // the shipped model must not change; `--devices 0` is not a device count.
    let run = |devices: &str| {
        let out = jamba()
            .args([
                "generate",
                "--prompt",
                "In the beginning",
                "--max-new-tokens",
                "12",
            ])
            .args(["--temperature", "0", "--devices", devices])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "--devices {devices}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let one = run("1");
    assert!(
        one.len() > "In the beginning".len(),
        "generated nothing: {one:?}"
    );
    assert_eq!(run("3"), one);
    assert_eq!(run("0,0"), one);
    let out = jamba()
        .args(["generate", "--prompt", "x", "--devices", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected a count"));
}
