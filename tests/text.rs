//! Tokenizer, chat template, streaming text and `jamba generate` end to end on a fixture model.

mod common;

use std::path::Path;
use std::process::Command;

use burn::backend::NdArray;
use burn::tensor::DType;
use common::*;
use jamba::generate::{GenerationConfig, SamplingConfig};
use jamba::tokenizer::{generate_text, TextStreamer};
use jamba::{ChatMessage, JambaForCausalLM, Tokenizer};

const CORPUS: &str = "In the beginning God created the heaven and the earth. And the earth was without form, \
and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. \
And God said, Let there be light: and there was light. Ünïcödé and émojis 🌍 round-trip too.";

fn trained() -> Tokenizer {
    let texts: Vec<String> = CORPUS.split(". ").map(|s| s.to_string()).collect();
    Tokenizer::train_bpe(&texts, 300, &["<|pad|>", "<|bos|>", "<|eos|>"]).unwrap()
}

/// tiny-b's weights (vocab 512) with a trained tokenizer and a chat template.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir("tiny-b").join(f), dir.path().join(f)).unwrap();
    }
    trained().save(dir.path().join("tokenizer.json")).unwrap();
    let template =
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";
    let cfg = serde_json::json!({ "chat_template": template, "bos_token": "<|bos|>", "eos_token": "<|eos|>" });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn bpe_round_trips_text() {
    let tok = trained();
    assert!(tok.vocab_size() <= 300);
    assert_eq!(tok.token_to_id("<|pad|>"), Some(0));
    assert_eq!(tok.token_to_id("<|eos|>"), Some(2));
    for text in [
        CORPUS,
        "And God saw the light, that it was good.",
        "  spaces\tand\nnew lines  ",
        "ÿ ☃ 🌍",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Saved and reloaded, it encodes the same.
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path().join("tokenizer.json")).unwrap();
    let back = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(
        back.encode(CORPUS, false).unwrap(),
        tok.encode(CORPUS, false).unwrap()
    );
}

#[test]
fn streamer_emits_whole_characters() {
    let tok = trained();
    let ids = tok.encode("émojis 🌍 ok", false).unwrap();
    let mut s = TextStreamer::new();
    let mut out = String::new();
    for id in ids {
        if let Some(piece) = s.push(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
    }
    assert_eq!(out, "émojis 🌍 ok");
}

#[test]
fn chat_template_renders() {
    let dir = model_dir();
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    assert!(tok.has_chat_template());
    let text = tok
        .apply_chat_template(&[ChatMessage::user("  Who made the light? ")], true)
        .unwrap();
    assert_eq!(text, "<|bos|>user: Who made the light?\nassistant:");
}

#[test]
fn text_generation_streams_and_stops_at_stop_strings() {
    let dir = model_dir();
    let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
    let model =
        JambaForCausalLM::<NdArray>::from_pretrained(dir.path(), &Default::default(), DType::F32)
            .unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 20,
        sampling: SamplingConfig {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut streamed = String::new();
    let (text, gen) = generate_text(&model, &tok, "In the beginning", &cfg, &[], |p| {
        streamed.push_str(p)
    })
    .unwrap();
    assert_eq!(streamed, text);
    assert_eq!(text, tok.decode(&gen.tokens[0], true).unwrap());
    assert!(!text.is_empty());
    // Stop at a piece of what was generated: the output ends right before it.
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    let mut streamed = String::new();
    let (cut, _) = generate_text(
        &model,
        &tok,
        "In the beginning",
        &cfg,
        std::slice::from_ref(&stop),
        |p| streamed.push_str(p),
    )
    .unwrap();
    assert_eq!(cut, text[..text.find(&stop).unwrap()]);
    assert_eq!(streamed, cut);
    assert!(generate_text(&model, &tok, "", &cfg, &[], |_| {}).is_err());
}

fn jamba(args: &[&str], model: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_jamba"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_generate_end_to_end() {
    let dir = model_dir();
    let out = jamba(
        &[
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("prefill:") && stderr.contains("tok/s") && stderr.contains("cache:"),
        "{stderr}"
    );
    let again = jamba(
        &[
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
        ],
        dir.path(),
    );
    assert_eq!(out.stdout, again.stdout, "same seed, same text");

    let chat = jamba(
        &[
            "--prompt",
            "Who?",
            "--chat",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        dir.path(),
    );
    assert!(
        chat.status.success(),
        "{}",
        String::from_utf8_lossy(&chat.stderr)
    );

    for bad in [
        vec!["--prompt", ""],
        vec!["--prompt", "x", "--top-p", "0"],
        vec!["--prompt", "x", "--temperature", "-1"],
        vec!["--prompt", "x", "--max-new-tokens", "300000"],
        vec!["--prompt", "x", "--backend", "metal"],
    ] {
        let out = jamba(&bad, dir.path());
        assert!(!out.status.success(), "{bad:?} should fail");
        assert!(
            out.stdout.is_empty(),
            "{bad:?} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn cli_generate_token_mode_reproduces_transformers() {
    let case = "tiny-a";
    let exp = expected(case);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    jamba::checkpoint::write_safetensors(
        &input,
        vec![("input_ids".into(), exp["generate.prompt"].clone())],
        None,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jamba"))
        .args(["generate", "--model"])
        .arg(fixture_dir(case))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args([
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = jamba::checkpoint::read_all(&output).unwrap();
    assert_eq!(
        got["tokens"]
            .clone()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap(),
        exp["generate.tokens"]
            .clone()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()
    );
    assert_close(
        "token-mode scores",
        &got["scores"].to_vec::<f32>().unwrap(),
        &exp["generate.scores"],
        1e-4,
    );
}
