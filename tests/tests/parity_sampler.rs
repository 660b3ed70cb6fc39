//! Our sampler streams against timm's `RepeatAugSampler` and torch's
//! `DistributedSampler`: identical index lists for every rank and epoch
//! (exact; the permutation is torch's `randperm` reproduced bit for bit).

use rsb_data::sampler::{SamplerKind, StreamSampler};
use rsb_integration_tests::{fixtures, read_json};

#[test]
fn index_lists_equal_timm_and_torch() {
    let cases = read_json(&fixtures("sampler").join("cases.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() > 20);
    for case in cases {
        let n = case["n"].as_u64().unwrap() as usize;
        let world = case["world"].as_u64().unwrap() as usize;
        let rank = case["rank"].as_u64().unwrap() as usize;
        let epoch = case["epoch"].as_u64().unwrap();
        let kind = match case["kind"].as_str().unwrap() {
            "repeat_aug" => {
                SamplerKind::RepeatAug { num_repeats: case["repeats"].as_u64().unwrap() as u32 }
            }
            _ => SamplerKind::Distributed,
        };
        let sampler = StreamSampler::new(n, world, kind, case["seed"].as_u64().unwrap());
        let want: Vec<usize> = case["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(sampler.samples_per_stream(), want.len(), "{case:?} length");
        assert_eq!(
            sampler.stream_indices(epoch, rank),
            want,
            "n {n} world {world} rank {rank} epoch {epoch}"
        );
    }
}
