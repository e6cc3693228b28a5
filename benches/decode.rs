//! Decode steps per second of the `tiny-a` fixture on the CPU reference backend.

use burn::backend::NdArray;
use burn::tensor::DType;
use criterion::{criterion_group, criterion_main, Criterion};
use jamba::generate::decode_step;
use jamba::{JambaForCausalLM, TokenBatch};

fn decode(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
    let model =
        JambaForCausalLM::<NdArray>::from_pretrained(dir, &Default::default(), DType::F32).unwrap();
    for batch in [1usize, 4] {
        let mut cache = model.new_cache(batch);
        let prompt = TokenBatch::new(
            (0..batch as i64 * 16).map(|i| 3 + i % 900).collect(),
            batch,
            16,
            None,
        )
        .unwrap();
        model.prefill(&prompt, &mut cache, 16, false).unwrap();
        let next: Vec<u32> = (0..batch as u32).map(|b| 7 + b).collect();
        c.bench_function(
            &format!("tiny-a decode step, batch {batch} (ndarray)"),
            |b| {
                b.iter_batched(
                    || cache.clone(),
                    |mut cache| decode_step(&model, &mut cache, &next).unwrap().into_data(),
                    criterion::BatchSize::SmallInput,
                )
            },
        );
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
