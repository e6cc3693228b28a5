//! Checkpoint handling: Hub and fused expert layouts, sharded files, f16/bf16 files, saving back
//! bit-exactly, and a typed error for every malformed input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::NdArray;
use burn::tensor::{DType, TensorData};
use common::*;
use jamba::checkpoint::{read_all, write_safetensors};
use jamba::{JambaConfig, JambaError, JambaForCausalLM, TokenBatch};

type B = NdArray<f32>;

fn weights(case: &str) -> BTreeMap<String, TensorData> {
    read_all(fixture_dir(case).join("model.safetensors")).unwrap()
}

/// A checkpoint folder with the fixture's config and the given tensors.
fn folder(case: &str, tensors: BTreeMap<String, TensorData>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir(case).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    write_safetensors(
        dir.path().join("model.safetensors"),
        tensors.into_iter().collect(),
        None,
    )
    .unwrap();
    dir
}

fn load(dir: &Path) -> Result<JambaForCausalLM<B>, JambaError> {
    JambaForCausalLM::<B>::from_pretrained(dir, &Default::default(), DType::F32)
}

fn logits(model: &JambaForCausalLM<B>, case: &str) -> Vec<f32> {
    let exp = expected(case);
    to_f32_vec(model.forward(&tokens(&exp), None, false).unwrap().logits)
}

#[test]
fn save_pretrained_round_trips_bit_exactly() {
    for case in ["tiny-a", "tiny-b"] {
        let model = load(&fixture_dir(case)).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save_pretrained(out.path()).unwrap();
        let original = weights(case);
        let saved = read_all(out.path().join("model.safetensors")).unwrap();
        assert_eq!(
            original.keys().collect::<Vec<_>>(),
            saved.keys().collect::<Vec<_>>(),
            "{case}: saved keys differ"
        );
        for (k, v) in &original {
            assert_eq!(v.shape, saved[k].shape, "{case}: {k} shape");
            assert_eq!(v.as_bytes(), saved[k].as_bytes(), "{case}: {k} bytes");
        }
        let cfg = JambaConfig::from_file(out.path().join("config.json")).unwrap();
        assert_eq!(cfg.num_hidden_layers, model.config().num_hidden_layers);
        assert_eq!(cfg.tie_word_embeddings, model.config().tie_word_embeddings);
        // No temporary files are left behind by the atomic writes.
        let names: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}

#[test]
fn fused_expert_layout_loads_the_same_model() {
    let case = "tiny-a";
    let cfg = JambaConfig::from_file(fixture_dir(case).join("config.json")).unwrap();
    let mut fused = BTreeMap::new();
    let hub = weights(case);
    for layer in cfg.moe_layers() {
        let p = format!("model.layers.{layer}.feed_forward.experts");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..cfg.num_experts {
            gate_up.extend(
                hub[&format!("{p}.{e}.gate_proj.weight")]
                    .to_vec::<f32>()
                    .unwrap(),
            );
            gate_up.extend(
                hub[&format!("{p}.{e}.up_proj.weight")]
                    .to_vec::<f32>()
                    .unwrap(),
            );
            down.extend(
                hub[&format!("{p}.{e}.down_proj.weight")]
                    .to_vec::<f32>()
                    .unwrap(),
            );
        }
        let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
        fused.insert(
            format!("{p}.gate_up_proj"),
            TensorData::new(gate_up, [e, 2 * i, h]),
        );
        fused.insert(format!("{p}.down_proj"), TensorData::new(down, [e, h, i]));
    }
    for (k, v) in hub {
        if !k.contains(".experts.") {
            fused.insert(k, v);
        }
    }
    let dir = folder(case, fused);
    let a = logits(&load(dir.path()).unwrap(), case);
    let b = logits(&load(&fixture_dir(case)).unwrap(), case);
    assert_eq!(a, b);
}

#[test]
fn sharded_checkpoint_loads() {
    let case = "tiny-b";
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir(case).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let all: Vec<(String, TensorData)> = weights(case).into_iter().collect();
    let (first, second) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        write_safetensors(dir.path().join(&file), part.to_vec(), None).unwrap();
        for (k, _) in part {
            map.insert(k.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let exp = expected(case);
    assert_close(
        "sharded logits",
        &logits(&load(dir.path()).unwrap(), case),
        &exp["logits"],
        1e-4,
    );
}

#[test]
fn half_precision_files_load_into_f32() {
    // Rounding the weights to 16 bits moves the logits; 3e-2 relative (L2) bounds it (see common).
    let case = "tiny-b";
    for dtype in [DType::F16, DType::BF16] {
        let converted = weights(case)
            .into_iter()
            .map(|(k, v)| (k, v.convert_dtype(dtype)))
            .collect();
        let dir = folder(case, converted);
        let model = load(dir.path()).unwrap();
        assert_eq!(model.dtype(), DType::F32);
        let exp = expected(case);
        assert_close_l2(
            &format!("{dtype:?} file logits"),
            &logits(&model, case),
            &exp["logits"],
            3e-2,
        );
    }
}

#[test]
fn missing_tensor_is_named() {
    let mut w = weights("tiny-a");
    w.remove("model.layers.3.mamba.A_log");
    let dir = folder("tiny-a", w);
    match load(dir.path()) {
        Err(JambaError::MissingTensor { key, expected }) => {
            assert_eq!(key, "model.layers.3.mamba.A_log");
            assert_eq!(expected, vec![128, 16]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn misshaped_tensor_names_key_and_both_shapes() {
    let mut w = weights("tiny-a");
    w.insert(
        "model.layers.2.self_attn.k_proj.weight".into(),
        TensorData::new(vec![0f32; 64 * 64], [64, 64]),
    );
    let dir = folder("tiny-a", w);
    let err = load(dir.path()).unwrap_err();
    match &err {
        JambaError::ShapeMismatch {
            key,
            expected,
            found,
        } => {
            assert_eq!(key, "model.layers.2.self_attn.k_proj.weight");
            assert_eq!(expected, &vec![32, 64]);
            assert_eq!(found, &vec![64, 64]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("[64, 64]") && msg.contains("[32, 64]"),
        "{msg}"
    );
}

#[test]
fn unexpected_tensor_is_reported() {
    let mut w = weights("tiny-b");
    w.insert(
        "model.layers.9.mamba.D".into(),
        TensorData::new(vec![1f32; 4], [4]),
    );
    let dir = folder("tiny-b", w);
    match load(dir.path()) {
        Err(JambaError::UnexpectedTensors { count, first, .. }) => {
            assert_eq!(count, 1);
            assert_eq!(first, "model.layers.9.mamba.D");
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
}

#[test]
fn bad_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No config.
    assert!(matches!(load(dir.path()), Err(JambaError::Io { .. })));
    // Malformed config.
    std::fs::write(
        dir.path().join("config.json"),
        "{\"hidden_size\": \"wide\"}",
    )
    .unwrap();
    assert!(matches!(
        load(dir.path()),
        Err(JambaError::ConfigParse { .. })
    ));
    // Config, but no weights.
    std::fs::copy(
        fixture_dir("tiny-b").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    assert!(matches!(
        load(dir.path()),
        Err(JambaError::BadCheckpoint { .. })
    ));
    // Weights that are not safetensors.
    std::fs::write(dir.path().join("model.safetensors"), b"not a checkpoint").unwrap();
    assert!(matches!(
        load(dir.path()),
        Err(JambaError::BadCheckpoint { .. })
    ));
}

#[test]
fn unsupported_dtype_on_backend_is_an_error() {
    // NdArray computes in f32/f64 only.
    let err = JambaForCausalLM::<B>::from_pretrained(
        fixture_dir("tiny-b"),
        &Default::default(),
        DType::F16,
    )
    .unwrap_err();
    assert!(
        matches!(err, JambaError::DtypeNotSupported { .. }),
        "{err:?}"
    );
}

#[test]
fn bad_tokens_give_typed_errors() {
    let model = load(&fixture_dir("tiny-b")).unwrap();
    match model.forward(&TokenBatch::single(&[5, 512, 7]), None, false) {
        Err(JambaError::TokenOutOfRange {
            id,
            position,
            vocab_size,
        }) => {
            assert_eq!((id, position, vocab_size), (512, 1, 512));
        }
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    assert!(matches!(
        model.forward(&TokenBatch::single(&[5, -1]), None, false),
        Err(JambaError::TokenOutOfRange { id: -1, .. })
    ));
    assert!(matches!(
        model.forward(&TokenBatch::single(&[]), None, false),
        Err(JambaError::BadInput { .. })
    ));
    assert!(matches!(
        TokenBatch::new(vec![1, 2, 3], 2, 2, None),
        Err(JambaError::BadInput { .. })
    ));
    assert!(matches!(
        TokenBatch::new(vec![1, 2], 1, 2, Some(vec![1, 2])),
        Err(JambaError::BadInput { .. })
    ));

    let mut cfg = model.config().clone();
    cfg.max_position_embeddings = 4;
    let short = JambaForCausalLM::<B>::init(&cfg, &Default::default(), DType::F32).unwrap();
    match short.forward(&TokenBatch::single(&[5, 6, 7, 8, 9]), None, false) {
        Err(JambaError::ContextExceeded { length, max }) => assert_eq!((length, max), (5, 4)),
        other => panic!("expected ContextExceeded, got {other:?}"),
    }
}

#[test]
fn random_init_follows_transformers() {
    let cfg = JambaConfig::from_file(fixture_dir("tiny-a").join("config.json")).unwrap();
    let model = JambaForCausalLM::<B>::init(&cfg, &Default::default(), DType::F32).unwrap();
    let t: BTreeMap<String, TensorData> = model.export_tensors().into_iter().collect();
    assert_eq!(t.len(), weights("tiny-a").len());
    let v = |k: &str| t[k].to_vec::<f32>().unwrap();
    assert_eq!(
        &v("model.layers.0.mamba.A_log")[..3],
        &[0.0, 2f32.ln(), 3f32.ln()]
    );
    assert!(v("model.layers.0.mamba.D").iter().all(|x| *x == 1.0));
    assert!(v("model.layers.0.mamba.dt_proj.bias")
        .iter()
        .all(|x| *x == 0.0));
    assert!(v("model.layers.0.mamba.dt_layernorm.weight")
        .iter()
        .all(|x| *x == 1.0));
    let emb = v("model.embed_tokens.weight");
    assert!(emb[..64].iter().all(|x| *x == 0.0), "padding row is zero");
    let w = v("model.layers.2.self_attn.q_proj.weight");
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!(
        (std - 0.1).abs() < 0.01,
        "std {std} vs initializer_range 0.1"
    );
}
