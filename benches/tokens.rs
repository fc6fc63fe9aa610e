//! Cost of chatgate's own token counts (o200k_base via tiktoken-rs), made only for streams
//! whose upstream reports no usage: per KiB of real English and Chinese text, and the
//! one-time vocabulary load.

use std::hint::black_box;

use chatgate::chat::token_count;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// The Gettysburg Address, first paragraphs (public domain).
const ENGLISH: &str = "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that field, as a final resting place for those who here gave their lives that that nation might live. It is altogether fitting and proper that we should do this. ";

/// 陶渊明《桃花源记》, opening (public domain).
const CHINESE: &str = "晋太元中，武陵人捕鱼为业。缘溪行，忘路之远近。忽逢桃花林，夹岸数百步，中无杂树，芳草鲜美，落英缤纷。渔人甚异之，复前行，欲穷其林。林尽水源，便得一山，山有小口，仿佛若有光。便舍船，从口入。初极狭，才通人。复行数十步，豁然开朗。土地平旷，屋舍俨然，有良田美池桑竹之属。阡陌交通，鸡犬相闻。其中往来种作，男女衣着，悉如外人。黄发垂髫，并怡然自乐。";

/// `text` repeated to at least `bytes`.
fn repeated(text: &str, bytes: usize) -> String {
    text.repeat(bytes.div_ceil(text.len()))
}

fn count(c: &mut Criterion) {
    token_count::load();
    let mut group = c.benchmark_group("token_count");
    for (name, text) in [("english", ENGLISH), ("chinese", CHINESE)] {
        let text = repeated(text, 16 << 10);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, "16KiB"), &text, |b, text| {
            b.iter(|| token_count::count(black_box(text)))
        });
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_count_load");
    group.sample_size(10);
    group.bench_function("o200k_base", |b| {
        b.iter(|| tiktoken_rs::o200k_base().map(|bpe| black_box(bpe).special_tokens().len()))
    });
    group.finish();
}

criterion_group!(benches, count, load);
criterion_main!(benches);
