//! The batch plan: how a recipe's global batch is held constant over any
//! world size. A recipe fixes `global_size` and `micro_size`, hence
//! `streams = global_size / micro_size` sampler streams (micro-batch slots of
//! one optimizer update). `world_size` ranks share the streams evenly, each
//! running `accumulation = streams / world_size` micro-batches per update:
//! `global = micro x accumulation x world`, whatever the world size.
//!
//! [`streams_of_rank`] is the one place that says which streams a rank runs
//! (contiguous blocks); the coordinator's plan, the data crate's samplers and
//! the worker's ranks all ask it.

use rsb_recipes::Recipe;
use std::ops::Range;

/// Why a world size cannot run a recipe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// No ranks.
    #[error("world size must be at least 1")]
    EmptyWorld,
    /// Micro-batches of no images.
    #[error("batch.micro_size must be at least 1")]
    EmptyMicroBatch,
    /// The streams of a recipe do not split evenly over the ranks.
    #[error(
        "{streams} micro-batches of {micro} per update (global batch {global}) do not split over {world} ranks; \
         {}",
        uneven_remedy(*streams, *world, *global)
    )]
    Uneven {
        /// Sampler streams.
        streams: u32,
        /// Ranks.
        world: u32,
        /// Micro-batch size.
        micro: u32,
        /// Global batch size.
        global: u32,
    },
    /// A number of streams does not split evenly over the ranks.
    #[error(
        "{streams} sampler streams cannot be split over {world} ranks; \
         the world size must divide the stream count"
    )]
    UnevenStreams {
        /// Sampler streams.
        streams: usize,
        /// Ranks.
        world: usize,
    },
    /// A rank outside the world.
    #[error("rank {rank} is not in a world of {world} ranks")]
    NoSuchRank {
        /// The rank asked for.
        rank: usize,
        /// Ranks.
        world: usize,
    },
}

/// The sampler streams rank `rank` of `world` runs, in the order it
/// accumulates them: the contiguous block `rank * k .. (rank + 1) * k` with
/// `k = num_streams / world`. The world size must divide the stream count.
pub fn streams_of_rank(
    num_streams: usize,
    world: usize,
    rank: usize,
) -> Result<Range<usize>, PlanError> {
    if world == 0 {
        return Err(PlanError::EmptyWorld);
    }
    if !num_streams.is_multiple_of(world) {
        return Err(PlanError::UnevenStreams { streams: num_streams, world });
    }
    if rank >= world {
        return Err(PlanError::NoSuchRank { rank, world });
    }
    let per_rank = num_streams / world;
    Ok(rank * per_rank..(rank + 1) * per_rank)
}

/// The per-rank share of the global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// Images per optimizer update over all ranks.
    pub global_size: u32,
    /// Images per forward pass.
    pub micro_size: u32,
    /// Ranks.
    pub world_size: u32,
    /// Micro-batches each rank accumulates per update.
    pub accumulation: u32,
    /// Sampler streams in all (`global_size / micro_size`).
    pub streams: u32,
}

/// What makes an uneven plan work: the world sizes that divide the
/// streams, and the micro-batch that would give `world` ranks one stream
/// each (per-rank BN statistics and Mixup pairs then cover that many images).
fn uneven_remedy(streams: u32, world: u32, global: u32) -> String {
    // The divisors of `streams`, found in pairs up to its square root.
    let (mut low, mut high) = (Vec::new(), Vec::new());
    let mut w = 1u64;
    while w * w <= u64::from(streams) {
        if u64::from(streams) % w == 0 {
            low.push(w);
            if w * w != u64::from(streams) {
                high.push(u64::from(streams) / w);
            }
        }
        w += 1;
    }
    let worlds: Vec<String> =
        low.into_iter().chain(high.into_iter().rev()).map(|w| w.to_string()).collect();
    let on_these = match worlds.split_last() {
        Some((last, [])) if last == "1" => "run on 1 rank".to_string(),
        Some((last, [])) => format!("run on {last} ranks"),
        Some((last, rest)) => format!("run on {} or {last} ranks", rest.join(", ")),
        None => "change the batch".to_string(),
    };
    if world > 0 && global.is_multiple_of(world) {
        format!(
            "{on_these}, or set batch.micro_size to {} ({global} / {world}) for {world} ranks",
            global / world
        )
    } else {
        format!("{on_these}, or change batch.micro_size")
    }
}

impl BatchPlan {
    /// Plans `recipe` over `world_size` ranks.
    pub fn new(recipe: &Recipe, world_size: u32) -> Result<BatchPlan, PlanError> {
        BatchPlan::from_sizes(recipe.batch.global_size, recipe.batch.micro_size, world_size)
    }

    /// Plans a global batch of `global` images in micro-batches of `micro`
    /// over `world_size` ranks.
    pub fn from_sizes(global: u32, micro: u32, world_size: u32) -> Result<BatchPlan, PlanError> {
        if world_size == 0 {
            return Err(PlanError::EmptyWorld);
        }
        if micro == 0 {
            return Err(PlanError::EmptyMicroBatch);
        }
        let streams = global / micro;
        if !streams.is_multiple_of(world_size) {
            return Err(PlanError::Uneven { streams, world: world_size, micro, global });
        }
        Ok(BatchPlan {
            global_size: global,
            micro_size: micro,
            world_size,
            accumulation: streams / world_size,
            streams,
        })
    }

    /// The sampler streams rank `rank` runs, in the order it accumulates them
    /// (empty for a rank outside the world).
    pub fn streams_of(&self, rank: u32) -> Vec<u32> {
        streams_of_rank(self.streams as usize, self.world_size as usize, rank as usize)
            .map(|streams| streams.map(|s| s as u32).collect())
            .unwrap_or_default()
    }
}

/// The hosts of an elastic job that run its next generation when not all
/// of them can: given each host's ranks (in join order), the largest world
/// that splits `streams` sampler streams, on at least `min_hosts` hosts,
/// and of the sets of hosts that make it, the one that keeps the earliest
/// joined (rank 0's host, then the next). Returns the chosen hosts' indices
/// in order, or `None` when no such set exists (the job waits for joins).
/// With every host's ranks taken, it is every host. Past
/// [`MOST_SPLIT_CELLS`] of work (thousands of hosts of different sizes),
/// only sets of the first hosts in join order are weighed.
pub fn hosts_that_split(
    ranks_per_host: &[u32],
    streams: u32,
    min_hosts: usize,
) -> Option<Vec<usize>> {
    let total: u64 = ranks_per_host.iter().map(|&r| u64::from(r)).sum();
    let n = ranks_per_host.len();
    if total >= 1
        && total <= u64::from(streams)
        && u64::from(streams) % total == 0
        && n >= min_hosts
    {
        return Some((0..n).collect());
    }
    let top = usize::try_from(total.min(u64::from(streams))).ok()?;
    let cells = (n + 1).checked_mul(top + 1);
    if n >= usize::from(NO_SET) || cells.is_none_or(|c| c > MOST_SPLIT_CELLS) {
        return first_hosts_that_split(ranks_per_host, streams, min_hosts);
    }
    // most[i * width + s]: the most hosts among hosts i.. whose ranks sum
    // to s (NO_SET: no set does). Sums above `top` cannot split the streams.
    let width = top + 1;
    let mut most = vec![NO_SET; (n + 1) * width];
    most[n * width] = 0;
    for i in (0..n).rev() {
        let r = ranks_per_host[i] as usize;
        for s in 0..=top {
            let without = most[(i + 1) * width + s];
            let with = match r >= 1 && r <= s {
                true => match most[(i + 1) * width + s - r] {
                    NO_SET => NO_SET,
                    k => k + 1,
                },
                false => NO_SET,
            };
            most[i * width + s] = match (without, with) {
                (NO_SET, k) | (k, NO_SET) => k,
                (a, b) => a.max(b),
            };
        }
    }
    let reaches = |i: usize, s: usize, hosts: usize| {
        let k = most[i * width + s];
        k != NO_SET && usize::from(k) >= hosts
    };
    let world =
        (1..=top).rev().find(|&w| streams.is_multiple_of(w as u32) && reaches(0, w, min_hosts))?;
    // Earliest hosts first: take host i whenever the rest can still make
    // the world with enough hosts.
    let (mut chosen, mut left) = (Vec::new(), world);
    for (i, &r) in ranks_per_host.iter().enumerate() {
        let r = r as usize;
        let needed = min_hosts.saturating_sub(chosen.len() + 1);
        if r >= 1 && r <= left && reaches(i + 1, left - r, needed) {
            chosen.push(i);
            left -= r;
        }
    }
    debug_assert_eq!(left, 0);
    Some(chosen)
}

/// The most table cells [`hosts_that_split`] fills (2 bytes each: 64 MiB),
/// a few hundred milliseconds at most under the coordinator's lock.
pub const MOST_SPLIT_CELLS: usize = 32 << 20;

/// A sum no set of hosts makes, in [`hosts_that_split`]'s table.
const NO_SET: u16 = u16::MAX;

/// [`hosts_that_split`] weighing only the first hosts in join order: the
/// longest such run, of at least `min_hosts`, whose ranks split `streams`.
fn first_hosts_that_split(
    ranks_per_host: &[u32],
    streams: u32,
    min_hosts: usize,
) -> Option<Vec<usize>> {
    let mut sum = 0u64;
    let mut best = None;
    for (i, &r) in ranks_per_host.iter().enumerate() {
        sum += u64::from(r);
        if sum > u64::from(streams) {
            break;
        }
        if i + 1 >= min_hosts && sum >= 1 && u64::from(streams) % sum == 0 {
            best = Some(i + 1);
        }
    }
    best.map(|hosts| (0..hosts).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_elastic_job_runs_on_the_largest_set_of_hosts_that_splits_its_streams() {
        // Every host's ranks split them: every host.
        assert_eq!(hosts_that_split(&[1, 1, 1, 1], 4, 2), Some(vec![0, 1, 2, 3]));
        // 3 of 4 single-rank hosts left, 4 streams: the first 2 run.
        assert_eq!(hosts_that_split(&[1, 1, 1], 4, 2), Some(vec![0, 1]));
        // 3 hosts of 8 GPUs, 32 streams: 2 hosts (16 ranks).
        assert_eq!(hosts_that_split(&[8, 8, 8], 32, 1), Some(vec![0, 1]));
        // ... but not with at least 3 hosts: wait for a join.
        assert_eq!(hosts_that_split(&[8, 8, 8], 32, 3), None);
        // Mixed hosts: 4 + 2 + 2 of 8 streams is every host; 4 + 4 + 2 of
        // 8: the first two.
        assert_eq!(hosts_that_split(&[4, 2, 2], 8, 1), Some(vec![0, 1, 2]));
        assert_eq!(hosts_that_split(&[4, 4, 2], 8, 1), Some(vec![0, 1]));
        // 6 streams over hosts of 4, 2 and 4 ranks: 6 = 4 + 2 (the first
        // two); with 3 hosts needed, none.
        assert_eq!(hosts_that_split(&[4, 2, 4], 6, 2), Some(vec![0, 1]));
        assert_eq!(hosts_that_split(&[4, 2, 4], 6, 3), None);
        // Later hosts are taken where an earlier one cannot make the world:
        // 3 + 1 ranks split 4 streams, but of 2 streams only 1 + 1 do.
        assert_eq!(hosts_that_split(&[3, 1, 1], 4, 2), Some(vec![0, 1]));
        assert_eq!(hosts_that_split(&[3, 1, 1], 2, 2), Some(vec![1, 2]));
        // More hosts rather than fewer at the same world, when needed.
        assert_eq!(hosts_that_split(&[2, 1, 1], 2, 2), Some(vec![1, 2]));
        assert_eq!(hosts_that_split(&[2, 1, 1], 2, 1), Some(vec![0]));
        assert_eq!(hosts_that_split(&[], 4, 0), None);
        assert_eq!(hosts_that_split(&[5], 4, 1), None);
    }

    #[test]
    fn past_its_work_bound_only_the_first_hosts_are_weighed() {
        // 5,000 hosts of 8 ranks left, 65,536 streams: 5,001 x 40,001 cells.
        let mut ranks = vec![8u32; 5000];
        let chosen = hosts_that_split(&ranks, 1 << 16, 2).unwrap();
        assert_eq!(chosen, (0..4096).collect::<Vec<_>>(), "32,768 ranks on the first 4,096");
        // Of other sizes, a run of first hosts only: 8 + 4 + 8 ... never
        // makes a power of two past 8 (skipping host 1 would).
        ranks[1] = 4;
        assert_eq!(hosts_that_split(&ranks, 1 << 16, 1), Some(vec![0]));
        assert_eq!(hosts_that_split(&ranks, 1 << 16, 2), None);
        assert_eq!(first_hosts_that_split(&[3, 1], 4, 1), Some(vec![0, 1]));
        assert_eq!(first_hosts_that_split(&[3, 2], 4, 1), None);
        assert_eq!(first_hosts_that_split(&[1, 1, 1], 4, 3), None);
    }

    #[test]
    fn the_chosen_hosts_always_split_the_streams() {
        // Exhaustive over small cases: the choice splits, has enough hosts,
        // and no set of hosts makes a larger world that does.
        for streams in 1..=12u32 {
            for n in 0..=4usize {
                let mut ranks = vec![1u32; n];
                loop {
                    for min_hosts in 0..=n {
                        let best = (0..1u32 << n)
                            .filter(|set| set.count_ones() as usize >= min_hosts)
                            .map(|set| {
                                (0..n).filter(|i| set >> i & 1 == 1).map(|i| ranks[i]).sum::<u32>()
                            })
                            .filter(|&w| w >= 1 && streams.is_multiple_of(w))
                            .max();
                        let chosen = hosts_that_split(&ranks, streams, min_hosts);
                        match (best, &chosen) {
                            (None, None) => {}
                            (Some(w), Some(hosts)) => {
                                let world: u32 = hosts.iter().map(|&i| ranks[i]).sum();
                                assert_eq!(world, w, "{ranks:?} {streams} {min_hosts}: {hosts:?}");
                                assert!(hosts.len() >= min_hosts, "{ranks:?} {streams}: {hosts:?}");
                            }
                            _ => {
                                panic!("{ranks:?} {streams} {min_hosts}: {chosen:?}, best {best:?}")
                            }
                        }
                    }
                    // The next assignment of 1..=4 ranks to each host.
                    let Some(i) = ranks.iter().position(|&r| r < 4) else { break };
                    ranks[i] += 1;
                    ranks[..i].iter_mut().for_each(|r| *r = 1);
                }
            }
        }
    }

    #[test]
    fn ranks_own_disjoint_contiguous_blocks_that_cover_every_stream() {
        for world in [1usize, 2, 3, 4, 6, 12] {
            let mut seen = Vec::new();
            for rank in 0..world {
                let block = streams_of_rank(12, world, rank).unwrap();
                assert_eq!(block.len(), 12 / world);
                assert_eq!(block.start, rank * (12 / world), "world {world} rank {rank}");
                seen.extend(block);
            }
            assert_eq!(seen, (0..12).collect::<Vec<_>>(), "world {world}");
        }
    }

    #[test]
    fn impossible_splits_are_refused_with_the_reason() {
        let err = streams_of_rank(12, 5, 0).unwrap_err().to_string();
        assert!(err.contains("12") && err.contains("5 ranks"), "{err}");
        assert_eq!(streams_of_rank(12, 4, 4), Err(PlanError::NoSuchRank { rank: 4, world: 4 }));
        assert_eq!(streams_of_rank(12, 0, 0), Err(PlanError::EmptyWorld));
        assert_eq!(BatchPlan::from_sizes(16, 0, 1), Err(PlanError::EmptyMicroBatch));
    }

    #[test]
    fn an_uneven_plan_names_the_world_sizes_and_the_micro_batch_that_work() {
        // Table 3's ResNet-50 A2 (4 x 512) on 4 hosts of 8 GPUs.
        let err = BatchPlan::from_sizes(2048, 512, 32).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "do not split over 32 ranks; run on 1, 2 or 4 ranks, or set batch.micro_size \
                 to 64 (2048 / 32) for 32 ranks"
            ),
            "{err}"
        );
        // 3 ranks cannot share 2048 images evenly at any micro-batch.
        let err = BatchPlan::from_sizes(2048, 512, 3).unwrap_err().to_string();
        assert!(err.ends_with("run on 1, 2 or 4 ranks, or change batch.micro_size"), "{err}");
        let err = BatchPlan::from_sizes(16, 16, 2).unwrap_err().to_string();
        assert!(
            err.ends_with("run on 1 rank, or set batch.micro_size to 8 (16 / 2) for 2 ranks"),
            "{err}"
        );
        let err = BatchPlan::from_sizes(2048, 16, 3).unwrap_err().to_string();
        assert!(err.contains("run on 1, 2, 4, 8, 16, 32, 64 or 128 ranks"), "{err}");
    }

    #[test]
    fn the_plan_uses_the_stream_rule() {
        let plan = BatchPlan::from_sizes(2048, 128, 4).unwrap();
        assert_eq!((plan.streams, plan.accumulation), (16, 4));
        for rank in 0..4u32 {
            let expected: Vec<u32> =
                streams_of_rank(16, 4, rank as usize).unwrap().map(|s| s as u32).collect();
            assert_eq!(plan.streams_of(rank), expected);
        }
        assert!(plan.streams_of(4).is_empty());
    }
}
