//! Mid-epoch positions and re-sharding of both samplers (timm's
//! `RepeatAugSampler` and the plain `DistributedSampler`): a run that goes
//! from 4 ranks to 3 ranks at update `k` visits exactly the samples the
//! uninterrupted 4-rank run visits (update by update, as multisets), and a
//! rank that resumes from a saved position continues with the same batches.

use rsb_data::sampler::{
    streams_of_rank, RankSampler, SamplerKind, SamplerPosition, StreamSampler,
};
use std::collections::BTreeMap;

const STREAMS: usize = 12;
const MICRO: usize = 8;

fn kinds() -> [SamplerKind; 2] {
    [SamplerKind::RepeatAug { num_repeats: 3 }, SamplerKind::Distributed]
}

/// For updates `from..to` of `epoch`, the multiset of (update, index) a set
/// of rank samplers produces.
fn visit(ranks: &mut [RankSampler], updates: u64) -> BTreeMap<(u64, u64, usize), usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..updates {
        for r in ranks.iter_mut() {
            let p = r.position();
            for (_, indices) in r.next_update() {
                for i in indices {
                    *seen.entry((p.epoch, p.step, i)).or_insert(0) += 1;
                }
            }
        }
    }
    seen
}

fn ranks(sampler: &StreamSampler, world: usize) -> Vec<RankSampler> {
    (0..world).map(|r| RankSampler::new(sampler.clone(), MICRO, world, r).unwrap()).collect()
}

#[test]
fn four_ranks_to_three_at_an_update_boundary_neither_drop_nor_duplicate() {
    for kind in kinds() {
        let sampler = StreamSampler::new(1000, STREAMS, kind, 17);
        let spe = sampler.steps_per_epoch(MICRO);
        assert!(spe >= 8, "{spe}");
        let k = 5;
        // Uninterrupted: 4 ranks for the whole epoch and 3 updates of the next.
        let mut four = ranks(&sampler, 4);
        let uninterrupted = visit(&mut four, spe + 3);

        // Interrupted: 4 ranks to update k, then 3 ranks from the same position.
        let mut before = ranks(&sampler, 4);
        let mut seen = visit(&mut before, k);
        let position = before[0].position();
        assert!(before.iter().all(|r| r.position() == position));
        assert_eq!(position, SamplerPosition { epoch: 0, step: k });
        let mut after: Vec<RankSampler> =
            (0..3).map(|r| before[0].reshard(3, r).unwrap()).collect();
        assert_eq!(after[2].streams(), &[8, 9, 10, 11]);
        // What is left of the epoch, by the explicit API, equals what the new ranks will visit.
        let mut left: Vec<usize> =
            after.iter().flat_map(|r| r.remaining_indices()).flatten().collect();
        for (key, n) in visit(&mut after, spe - k + 3) {
            *seen.entry(key).or_insert(0) += n;
        }
        assert_eq!(seen, uninterrupted, "{kind:?}: re-sharded run differs");

        let mut want: Vec<usize> = uninterrupted
            .iter()
            .filter(|((e, s, _), _)| *e == 0 && *s >= k)
            .flat_map(|((_, _, i), n)| std::iter::repeat_n(*i, *n))
            .collect();
        left.sort_unstable();
        want.sort_unstable();
        assert_eq!(left, want, "{kind:?}: remaining_indices");
    }
}

#[test]
fn repeated_augmentation_copies_stay_the_designed_repeats() {
    let sampler = StreamSampler::new(1024, STREAMS, SamplerKind::RepeatAug { num_repeats: 3 }, 0);
    let mut counts = BTreeMap::new();
    for s in 0..STREAMS {
        for i in sampler.stream_indices(0, s) {
            *counts.entry(i).or_insert(0usize) += 1;
        }
    }
    // timm keeps len(dataset) // 256 * 256 samples in all: at most 3 copies each.
    assert!(counts.values().all(|&c| c <= 3));
    assert_eq!(counts.values().sum::<usize>(), 1024 / 256 * 256 / STREAMS * STREAMS);
}

#[test]
fn a_resumed_rank_continues_with_the_same_batches() {
    for kind in kinds() {
        let sampler = StreamSampler::new(777, STREAMS, kind, 3);
        let mut a = RankSampler::new(sampler.clone(), MICRO, 2, 1).unwrap();
        for _ in 0..7 {
            a.next_update();
        }
        let saved = a.position();
        let mut b = RankSampler::new(sampler, MICRO, 2, 1).unwrap();
        b.seek(saved).unwrap();
        for _ in 0..10 {
            assert_eq!(a.next_update(), b.next_update());
        }
    }
}

#[test]
fn uneven_worlds_are_refused() {
    let err = streams_of_rank(STREAMS, 5, 0).unwrap_err().to_string();
    assert!(err.contains("12") && err.contains("5 ranks"), "{err}");
    assert!(streams_of_rank(STREAMS, 4, 4).is_err());
    assert_eq!(streams_of_rank(STREAMS, 4, 1).unwrap(), vec![3, 4, 5]);
}
