//! [`MetricsRecord`] <-> the `record` of a `MetricsReport`: field for field,
//! so what rank 0 sends is exactly what the coordinator writes.

use crate::v1::generation_reason::Reason;
use crate::v1::{self as pb, metrics_report::Record};
use rsb_job::{
    EvalSetAccuracy, FabricProbe, GenerationReason, LinkSpeed, MetricsRecord, RankBalance,
};

impl From<&GenerationReason> for pb::GenerationReason {
    fn from(reason: &GenerationReason) -> pb::GenerationReason {
        let reason = match reason.clone() {
            // Sent as no reason, which the other side reads as none.
            GenerationReason::Unknown => return pb::GenerationReason { reason: None },
            GenerationReason::Start => Reason::Start(pb::GenerationStart {}),
            GenerationReason::LostHost { host, detail } => {
                Reason::LostHost(pb::LostHost { host, detail })
            }
            GenerationReason::RankFailed { rank, host, detail } => {
                Reason::RankFailed(pb::RankFailed { rank, host, detail })
            }
            GenerationReason::TamperedLink { from_rank, from_host, to_rank, to_host, detail } => {
                Reason::TamperedLink(pb::TamperedLink {
                    from_rank,
                    from_host,
                    to_rank,
                    to_host,
                    detail,
                })
            }
            GenerationReason::Admitted { host } => Reason::Admitted(pb::HostAdmitted { host }),
            GenerationReason::StandingBy { host, detail } => {
                Reason::StandingBy(pb::HostStandingBy { host, detail })
            }
            GenerationReason::CoordinatorRestarted => {
                Reason::CoordinatorRestarted(pb::CoordinatorRestarted {})
            }
            GenerationReason::Retry { attempt, failure } => {
                Reason::Retry(pb::RunRetried { attempt, failure })
            }
        };
        pb::GenerationReason { reason: Some(reason) }
    }
}

/// The reason a wire message gives (none when it sets no reason).
fn reason_of(reason: pb::GenerationReason) -> Option<GenerationReason> {
    Some(match reason.reason? {
        Reason::Start(_) => GenerationReason::Start,
        Reason::LostHost(r) => GenerationReason::LostHost { host: r.host, detail: r.detail },
        Reason::RankFailed(r) => {
            GenerationReason::RankFailed { rank: r.rank, host: r.host, detail: r.detail }
        }
        Reason::TamperedLink(r) => GenerationReason::TamperedLink {
            from_rank: r.from_rank,
            from_host: r.from_host,
            to_rank: r.to_rank,
            to_host: r.to_host,
            detail: r.detail,
        },
        Reason::Admitted(r) => GenerationReason::Admitted { host: r.host },
        Reason::StandingBy(r) => GenerationReason::StandingBy { host: r.host, detail: r.detail },
        Reason::CoordinatorRestarted(_) => GenerationReason::CoordinatorRestarted,
        Reason::Retry(r) => GenerationReason::Retry { attempt: r.attempt, failure: r.failure },
    })
}

impl From<&MetricsRecord> for Record {
    fn from(record: &MetricsRecord) -> Record {
        match record.clone() {
            MetricsRecord::Loading { epoch, step, elapsed_s } => {
                Record::Loading(pb::LoadingRecord { epoch, step, elapsed_s })
            }
            MetricsRecord::FirstUpdate { epoch, step, elapsed_s } => {
                Record::FirstUpdate(pb::FirstUpdateRecord { epoch, step, elapsed_s })
            }
            MetricsRecord::Step {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                total_updates,
                skipped_updates,
                peak_gpu_memory_mib,
                rank_balance,
                input_wait_share,
            } => Record::Step(pb::StepRecord {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                total_updates,
                peak_gpu_memory_mib,
                skipped_updates,
                rank_balance: rank_balance.map(|b| pb::RankBalance {
                    slowest_rank: b.slowest_rank,
                    slowest_s: b.slowest_s,
                    slowest_input_wait_s: b.slowest_input_wait_s,
                    others_median_s: b.others_median_s,
                }),
                input_wait_share,
            }),
            MetricsRecord::Epoch {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                top1,
                top5,
                val_loss,
                replaced_samples,
                elapsed_s,
                eval_sets,
                skipped_updates,
                val_skipped_images,
            } => Record::Epoch(pb::EpochRecord {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                top1,
                top5,
                val_loss,
                replaced_samples,
                elapsed_s,
                eval_sets: eval_sets
                    .into_iter()
                    .map(|(name, a)| pb::EvalSetAccuracy {
                        name,
                        top1: a.top1,
                        top5: a.top5,
                        count: a.count,
                        excluded: a.excluded,
                        skipped: a.skipped,
                    })
                    .collect(),
                skipped_updates,
                val_skipped_images,
            }),
            MetricsRecord::Checksum { rank, step, sum, sum_of_squares } => {
                Record::Checksum(pb::ChecksumRecord { rank, step, sum, sum_of_squares })
            }
            MetricsRecord::Fabric(FabricProbe {
                epoch,
                step,
                world_size,
                probe_bytes,
                all_reduce_s,
                bus_gb_per_s,
                links,
            }) => Record::Fabric(pb::FabricRecord {
                epoch,
                step,
                world_size,
                probe_bytes,
                all_reduce_s,
                bus_gb_per_s,
                links: links
                    .into_iter()
                    .map(|l| pb::LinkSpeed {
                        from_rank: l.from_rank,
                        to_rank: l.to_rank,
                        gb_per_s: l.gb_per_s,
                    })
                    .collect(),
            }),
            MetricsRecord::Generation {
                generation,
                hosts,
                world_size,
                accumulation,
                resume_from,
                resume_step,
                reasons,
            } => Record::GenerationStart(pb::GenerationRecord {
                generation,
                hosts,
                world_size,
                accumulation,
                resume_from,
                resume_step,
                reasons: reasons.iter().map(pb::GenerationReason::from).collect(),
            }),
        }
    }
}

impl From<Record> for MetricsRecord {
    fn from(record: Record) -> MetricsRecord {
        match record {
            Record::Loading(r) => {
                MetricsRecord::Loading { epoch: r.epoch, step: r.step, elapsed_s: r.elapsed_s }
            }
            Record::FirstUpdate(r) => {
                MetricsRecord::FirstUpdate { epoch: r.epoch, step: r.step, elapsed_s: r.elapsed_s }
            }
            Record::Step(r) => MetricsRecord::Step {
                epoch: r.epoch,
                step: r.step,
                lr: r.lr,
                loss: r.loss,
                images_per_sec: r.images_per_sec,
                total_updates: r.total_updates,
                skipped_updates: r.skipped_updates,
                peak_gpu_memory_mib: r.peak_gpu_memory_mib,
                rank_balance: r.rank_balance.map(|b| RankBalance {
                    slowest_rank: b.slowest_rank,
                    slowest_s: b.slowest_s,
                    slowest_input_wait_s: b.slowest_input_wait_s,
                    others_median_s: b.others_median_s,
                }),
                input_wait_share: r.input_wait_share,
            },
            Record::Epoch(r) => MetricsRecord::Epoch {
                epoch: r.epoch,
                step: r.step,
                lr: r.lr,
                loss: r.loss,
                images_per_sec: r.images_per_sec,
                top1: r.top1,
                top5: r.top5,
                val_loss: r.val_loss,
                replaced_samples: r.replaced_samples,
                elapsed_s: r.elapsed_s,
                eval_sets: r
                    .eval_sets
                    .into_iter()
                    .map(|s| {
                        let accuracy = EvalSetAccuracy {
                            top1: s.top1,
                            top5: s.top5,
                            count: s.count,
                            excluded: s.excluded,
                            skipped: s.skipped,
                        };
                        (s.name, accuracy)
                    })
                    .collect(),
                skipped_updates: r.skipped_updates,
                val_skipped_images: r.val_skipped_images,
            },
            Record::Checksum(r) => MetricsRecord::Checksum {
                rank: r.rank,
                step: r.step,
                sum: r.sum,
                sum_of_squares: r.sum_of_squares,
            },
            Record::Fabric(r) => MetricsRecord::Fabric(FabricProbe {
                epoch: r.epoch,
                step: r.step,
                world_size: r.world_size,
                probe_bytes: r.probe_bytes,
                all_reduce_s: r.all_reduce_s,
                bus_gb_per_s: r.bus_gb_per_s,
                links: r
                    .links
                    .into_iter()
                    .map(|l| LinkSpeed {
                        from_rank: l.from_rank,
                        to_rank: l.to_rank,
                        gb_per_s: l.gb_per_s,
                    })
                    .collect(),
            }),
            Record::GenerationStart(r) => MetricsRecord::Generation {
                generation: r.generation,
                hosts: r.hosts,
                world_size: r.world_size,
                accumulation: r.accumulation,
                resume_from: r.resume_from,
                resume_step: r.resume_step,
                reasons: r.reasons.into_iter().filter_map(reason_of).collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_kind_survives_the_wire() {
        let mut sets = std::collections::BTreeMap::new();
        sets.insert(
            "real".to_string(),
            EvalSetAccuracy { top1: 81.5, top5: 95.0, count: 40, excluded: 3, skipped: 2 },
        );
        let records = [
            MetricsRecord::Loading { epoch: 1, step: 10, elapsed_s: 2.5 },
            MetricsRecord::FirstUpdate { epoch: 0, step: 1, elapsed_s: 7.25 },
            MetricsRecord::Step {
                epoch: 0,
                step: 20,
                lr: 1.5e-3,
                loss: 0.625,
                images_per_sec: 300.0,
                total_updates: 80,
                skipped_updates: 1,
                peak_gpu_memory_mib: Some(20_480.5),
                rank_balance: None,
                input_wait_share: Some(0.375),
            },
            MetricsRecord::Step {
                epoch: 0,
                step: 25,
                lr: 1.5e-3,
                loss: 0.5,
                images_per_sec: 310.0,
                total_updates: 80,
                skipped_updates: 0,
                peak_gpu_memory_mib: None,
                rank_balance: Some(RankBalance {
                    slowest_rank: 3,
                    slowest_s: 0.75,
                    slowest_input_wait_s: 0.125,
                    others_median_s: 0.5,
                }),
                input_wait_share: None,
            },
            MetricsRecord::Epoch {
                epoch: 2,
                step: 30,
                lr: 1e-6,
                loss: 0.5,
                images_per_sec: 250.0,
                top1: Some(87.5),
                top5: None,
                val_loss: Some(0.25),
                replaced_samples: 2,
                elapsed_s: 99.0,
                eval_sets: sets,
                skipped_updates: 3,
                val_skipped_images: Some(4),
            },
            MetricsRecord::Checksum { rank: 1, step: 4, sum: -3.5, sum_of_squares: 12.0 },
            MetricsRecord::Fabric(FabricProbe {
                epoch: 0,
                step: 0,
                world_size: 2,
                probe_bytes: 25 << 20,
                all_reduce_s: 0.0125,
                bus_gb_per_s: 2.097152,
                links: vec![
                    LinkSpeed { from_rank: 1, to_rank: 0, gb_per_s: 2.5 },
                    LinkSpeed { from_rank: 0, to_rank: 1, gb_per_s: 0.005 },
                ],
            }),
            MetricsRecord::Fabric(FabricProbe {
                epoch: 3,
                step: 90,
                world_size: 8,
                probe_bytes: 1 << 20,
                all_reduce_s: 0.001,
                bus_gb_per_s: 1.835,
                links: vec![],
            }),
            MetricsRecord::Generation {
                generation: 3,
                hosts: vec!["a".into(), "c".into()],
                world_size: 2,
                accumulation: 3,
                resume_from: Some("/run/checkpoints/epoch-0002".into()),
                resume_step: Some(12),
                reasons: vec![
                    GenerationReason::Start,
                    GenerationReason::LostHost { host: "b".into(), detail: "silent".into() },
                    GenerationReason::RankFailed {
                        rank: 1,
                        host: "c".into(),
                        detail: "ring".into(),
                    },
                    GenerationReason::TamperedLink {
                        from_rank: 0,
                        from_host: "a".into(),
                        to_rank: 1,
                        to_host: "c".into(),
                        detail: "failed its integrity check".into(),
                    },
                    GenerationReason::Admitted { host: "d".into() },
                    GenerationReason::StandingBy { host: "e".into(), detail: "3 ranks".into() },
                    GenerationReason::CoordinatorRestarted,
                    GenerationReason::Retry { attempt: 2, failure: "rank 0 failed".into() },
                ],
            },
        ];
        for record in records {
            let report = pb::MetricsReport {
                job_id: "job".into(),
                generation: 1,
                global_rank: 0,
                record: Some(Record::from(&record)),
                sequence: 3,
            };
            let decoded = pb::MetricsReport::decode(report.encode_to_vec().as_slice()).unwrap();
            let back = MetricsRecord::from(decoded.record.unwrap());
            assert_eq!(back, record);
        }
    }
}
