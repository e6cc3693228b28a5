//! Cached generation: prefill + decode steps reproduce transformers' full-recompute greedy decoding,
//! chunked prefill equals one prefill, a padded batch equals its rows alone, forks are independent.

mod common;

use burn::backend::NdArray;
use burn::tensor::{backend::Backend, DType, TensorData};
use common::*;
use jamba::generate::{decode_step, decode_step_separate, GenerationConfig, SamplingConfig};
use jamba::layer::LayerState;
use jamba::{HybridCache, JambaBackend, JambaForCausalLM, TokenBatch};

type B = NdArray<f32>;

fn load<Bk: JambaBackend>(case: &str, device: &Bk::Device) -> JambaForCausalLM<Bk> {
    JambaForCausalLM::<Bk>::from_pretrained(fixture_dir(case), device, DType::F32).unwrap()
}

/// Greedy generation of the fixture's 12 tokens, compared step by step with transformers.
fn check_greedy_generation<Bk: JambaBackend>(case: &str, device: &Bk::Device, tol: f32) {
    assert_greedy_matches(case, &load::<Bk>(case, device), case, tol);
}

#[test]
fn cached_greedy_decoding_matches_transformers() {
    for case in CASES {
        check_greedy_generation::<B>(case, &Default::default(), 1e-4);
    }
}

fn cache_values<Bk: Backend>(cache: &HybridCache<Bk>) -> Vec<Vec<f32>> {
    cache
        .layers
        .iter()
        .flat_map(|l| match l {
            LayerState::Attention(kv) => {
                let (k, v) = kv.get();
                vec![to_f32_vec(k), to_f32_vec(v)]
            }
            LayerState::Mamba(s) => vec![to_f32_vec(s.conv.clone()), to_f32_vec(s.ssm.clone())],
        })
        .collect()
}

#[test]
fn chunked_prefill_equals_one_prefill() {
    for case in ["tiny-a", "tiny-b"] {
        let model = load::<B>(case, &Default::default());
        let exp = expected(case);
        let tokens = tokens(&exp);
        let mut whole = model.new_cache(tokens.batch);
        let want = model
            .prefill(&tokens, &mut whole, tokens.len, false)
            .unwrap();
        let want_logits =
            TensorData::new(to_f32_vec(want), [tokens.batch * model.config().vocab_size]);
        let want_cache = cache_values(&whole);
        for chunk in [1, 3, 16] {
            let mut cache = model.new_cache(tokens.batch);
            let got = model.prefill(&tokens, &mut cache, chunk, false).unwrap();
            assert_eq!(cache.seq_len, tokens.len);
            assert_close(
                &format!("{case} chunk {chunk} logits"),
                &to_f32_vec(got),
                &want_logits,
                1e-5,
            );
            for (i, (g, w)) in cache_values(&cache).iter().zip(&want_cache).enumerate() {
                let w = TensorData::new(w.clone(), [w.len()]);
                assert_close(
                    &format!("{case} chunk {chunk} cache tensor {i}"),
                    g,
                    &w,
                    1e-5,
                );
            }
        }
        // The last logits of the prefill are those of a plain forward at the last position.
        let full = to_f32_vec(model.forward(&tokens, None, false).unwrap().logits);
        let v = model.config().vocab_size;
        let last: Vec<f32> = (0..tokens.batch)
            .flat_map(|b| {
                full[(b * tokens.len + tokens.len - 1) * v..(b * tokens.len + tokens.len) * v]
                    .to_vec()
            })
            .collect();
        assert_close(
            &format!("{case} prefill vs forward"),
            &last,
            &want_logits,
            1e-5,
        );
    }
}

#[test]
fn padded_batch_generates_what_each_row_generates_alone() {
    let case = "tiny-b";
    let model = load::<B>(case, &Default::default());
    let exp = expected(case);
    let ids = ids_of(&exp["input_ids"]);
    let mask = exp["attention_mask"]
        .clone()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let (batch, len) = (exp["input_ids"].shape[0], exp["input_ids"].shape[1]);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..len)
                .filter(|&t| mask[b * len + t] == 1)
                .map(|t| ids[b * len + t])
                .collect()
        })
        .collect();
    assert!(
        prompts[0].len() > prompts[2].len(),
        "the fixture's rows have different lengths"
    );
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        output_scores: true,
        ..Default::default()
    };
    let together = model.generate(&prompts, &cfg, |_| true).unwrap();
    for (b, prompt) in prompts.iter().enumerate() {
        let alone = model
            .generate(std::slice::from_ref(prompt), &cfg, |_| true)
            .unwrap();
        assert_eq!(together.tokens[b], alone.tokens[0], "row {b} tokens");
        for (s, (g, a)) in together.scores[b].iter().zip(&alone.scores[0]).enumerate() {
            assert_close(
                &format!("row {b} step {s}"),
                g,
                &TensorData::new(a.clone(), [a.len()]),
                1e-5,
            );
        }
    }
}

#[test]
fn forked_cache_continues_two_ways() {
    let case = "tiny-a";
    let model = load::<B>(case, &Default::default());
    let prompt: Vec<i64> = vec![5, 17, 300, 42, 7, 99, 123];
    let mut cache = model.new_cache(1);
    model
        .prefill(&TokenBatch::single(&prompt), &mut cache, 4, false)
        .unwrap();
    let mut fork = cache.clone();
    let a = to_f32_vec(decode_step(&model, &mut cache, &[11]).unwrap());
    let b = to_f32_vec(decode_step(&model, &mut fork, &[222]).unwrap());
    for (token, got) in [(11, a), (222, b)] {
        let mut fresh = prompt.clone();
        fresh.push(token);
        let mut c = model.new_cache(1);
        let want = to_f32_vec(
            model
                .prefill(&TokenBatch::single(&fresh), &mut c, 64, false)
                .unwrap(),
        );
        assert_close(
            &format!("fork with {token}"),
            &got,
            &TensorData::new(want.clone(), [want.len()]),
            1e-5,
        );
    }
}

#[test]
fn bad_generation_parameters_are_rejected() {
    let model = load::<B>("tiny-b", &Default::default());
    let run = |cfg: GenerationConfig, prompts: &[Vec<u32>]| model.generate(prompts, &cfg, |_| true);
    let p = vec![vec![5u32, 6, 7]];
    let bad_sampling = |s: SamplingConfig| GenerationConfig {
        sampling: s,
        ..Default::default()
    };
    assert!(run(
        bad_sampling(SamplingConfig {
            temperature: -1.0,
            ..Default::default()
        }),
        &p
    )
    .is_err());
    assert!(run(
        bad_sampling(SamplingConfig {
            top_p: Some(0.0),
            ..Default::default()
        }),
        &p
    )
    .is_err());
    assert!(run(
        bad_sampling(SamplingConfig {
            top_p: Some(1.5),
            ..Default::default()
        }),
        &p
    )
    .is_err());
    assert!(run(
        bad_sampling(SamplingConfig {
            top_k: Some(0),
            ..Default::default()
        }),
        &p
    )
    .is_err());
    assert!(run(GenerationConfig::default(), &[vec![]]).is_err());
    assert!(run(GenerationConfig::default(), &[]).is_err());
    let too_long = GenerationConfig {
        max_new_tokens: 300_000,
        ..Default::default()
    };
    assert!(matches!(
        run(too_long, &p),
        Err(jamba::JambaError::ContextExceeded { .. })
    ));
}

#[test]
fn sampling_is_reproducible_and_respects_eos() {
    let model = load::<B>("tiny-a", &Default::default());
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingConfig {
            temperature: 0.8,
            top_k: Some(50),
            top_p: Some(0.9),
            repetition_penalty: 1.1,
            seed: 7,
        },
        ..Default::default()
    };
    let p = vec![vec![5u32, 6, 7, 8]];
    let a = model.generate(&p, &cfg, |_| true).unwrap();
    let b = model.generate(&p, &cfg, |_| true).unwrap();
    assert_eq!(a.tokens, b.tokens, "same seed, same output");
    let other = model
        .generate(
            &p,
            &GenerationConfig {
                sampling: SamplingConfig {
                    seed: 8,
                    ..cfg.sampling.clone()
                },
                ..cfg.clone()
            },
            |_| true,
        )
        .unwrap();
    assert_ne!(a.tokens, other.tokens, "another seed, another output");
    // Stop at the first token produced, declared as EOS.
    let eos = a.tokens[0][2];
    let stopped = model
        .generate(
            &p,
            &GenerationConfig {
                eos_token_ids: vec![eos],
                ..cfg.clone()
            },
            |_| true,
        )
        .unwrap();
    let first = a.tokens[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(stopped.tokens[0], a.tokens[0][..=first].to_vec());
    assert_eq!(stopped.finish[0], jamba::FinishReason::Eos);
    // The callback can stop generation.
    let mut seen = 0;
    let cut = model
        .generate(&p, &cfg, |_| {
            seen += 1;
            seen < 3
        })
        .unwrap();
    assert_eq!(cut.tokens[0].len(), 3);
}

#[cfg(feature = "wgpu")]
#[test]
fn cached_greedy_decoding_matches_transformers_on_wgpu() {
    for case in CASES {
        check_greedy_generation::<burn::backend::Wgpu>(case, &Default::default(), 1e-3);
    }
}

/// Decoding with one composite operation per layer (`jamba::step`) computes what the layers'
/// operations compute one by one: at batch 3, over KV buffers that grow at the first step, with
/// and without the Mamba projections' biases (tiny-b, tiny-a), on ndarray (whose MoE layers
/// step operation by operation), on wgpu fused and on the CubeCL backend without fusion. The
/// kernels and their order are the same either way, so f32 results agree to rounding (1e-5).
fn check_composite_decoding<Bk: JambaBackend>(device: &Bk::Device, backend: &str) {
    for case in ["tiny-a", "tiny-b"] {
        let model = load::<Bk>(case, device);
        let (batch, len) = (3, 5);
        let ids: Vec<i64> = (0..batch * len)
            .map(|i| (i as i64 * 37 + 5) % 256)
            .collect();
        let prompt = TokenBatch::new(ids, batch, len, None).unwrap();
        let mut one = model.new_cache_with_capacity(batch, len);
        model.prefill(&prompt, &mut one, len, false).unwrap();
        let mut separate = one.clone();
        let mut next = vec![3u32, 77, 250];
        for step in 0..4 {
            let got = to_f32_vec(decode_step(&model, &mut one, &next).unwrap());
            let want = to_f32_vec(decode_step_separate(&model, &mut separate, &next).unwrap());
            assert_close(
                &format!("{backend} {case} step {step} logits"),
                &got,
                &TensorData::new(want.clone(), [want.len()]),
                1e-5,
            );
            let vocab = model.config().vocab_size;
            next = want
                .chunks(vocab)
                .map(|row| {
                    let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1));
                    best.unwrap().0 as u32
                })
                .collect();
        }
        assert_eq!(one.seq_len, separate.seq_len);
        let (got, want) = (cache_values(&one), cache_values(&separate));
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(
                &format!("{backend} {case} cache tensor {i}"),
                g,
                &TensorData::new(w.clone(), [w.len()]),
                1e-5,
            );
        }
    }
}

#[test]
fn composite_decoding_equals_separate_operations() {
    check_composite_decoding::<B>(&Default::default(), "ndarray");
}

#[cfg(feature = "wgpu")]
#[test]
fn composite_decoding_equals_separate_operations_on_wgpu() {
    check_composite_decoding::<burn::backend::Wgpu>(&Default::default(), "wgpu");
    check_composite_decoding::<jamba_kernels::WgpuUnfused>(&Default::default(), "wgpu-unfused");
}
