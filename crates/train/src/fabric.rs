//! The fabric probe made before a distributed run's first update
//! (`distributed.fabric_probe_mib`): each rank's incoming link, where the
//! backend has links of its own (the TCP ring), then all-reduces of the
//! probe's size in bucket-sized tensors on the training device, through
//! the gradients' own path (packing, staging, the backend, unpacking): one
//! to warm up, then the mean of three, timed to their end on the device.
//! One sum then gathers every rank's numbers, so every rank holds the same
//! [`FabricProbe`]; its time is the slowest rank's.
//!
//! The bus bandwidth is nccl-tests' formula over that time, so it counts
//! what the gradients pay besides the wire (a bucket's copies in and out):
//! it reads somewhat below `all_reduce_perf`'s figure on the same fabric,
//! and an expectation set from that figure needs some slack.
//!
//! A fabric that under-delivers costs every update of a run and says
//! nothing: NCCL just runs slower (users find out from nccl-tests, if they
//! think of running them). The probe puts the number in `metrics.jsonl`
//! and names the slowest link before the run spends hours at its pace.

use crate::ddp::{reduce_tensors, sum_scalars, Calls, Reduction, BUCKET_FLOATS};
use crate::error::TrainError;
use crate::host_read;
use rsb_collective::Collective;
use rsb_job::{FabricProbe, LinkSpeed};
use std::time::Instant;
use tch::{Kind, Tensor};

/// All-reduces timed, after one warm-up; their mean is the probe's time.
const TIMED_ALL_REDUCES: u32 = 3;

/// Measures the fabric with `bytes` (rounded up to whole f32s): see the
/// module documentation. `epoch` and `step` place the record in the run.
/// `None` at world size 1 or for a probe of no bytes; every rank of a
/// larger world calls it together and gets the same probe.
pub fn probe_fabric(
    collective: &mut dyn Collective,
    calls: Calls,
    bytes: usize,
    epoch: u64,
    step: u64,
) -> Result<Option<FabricProbe>, TrainError> {
    let world = collective.world_size();
    if world < 2 || bytes == 0 {
        return Ok(None);
    }
    let rank = collective.rank();
    let incoming = collective.probe_incoming_link(bytes).map_err(|error| {
        TrainError::Collective { operation: "link probe of the fabric probe".into(), error }
    })?;
    let floats = bytes.div_ceil(4);
    // Bucket-sized tensors, as the gradients travel, through the same path
    // (the ring's staging pool keeps their pinned buffers for a later
    // tensor of the same length).
    let mut tensors = Vec::new();
    for start in (0..floats).step_by(BUCKET_FLOATS) {
        let len = BUCKET_FLOATS.min(floats - start);
        tensors.push(Tensor::f_zeros([len as i64], (Kind::Float, calls.device))?);
    }
    let last = tensors.last().expect("at least one float").shallow_clone();
    reduce_tensors(collective, calls, &tensors, Reduction::Sum, "warm-up of the fabric probe")?;
    host_read::f32s_of(&last.f_narrow(0, 0, 1)?)?;
    // Timed to their end on the device (the read waits for them there),
    // after a warm-up, as nccl-tests time theirs.
    let start = Instant::now();
    for _ in 0..TIMED_ALL_REDUCES {
        reduce_tensors(
            collective,
            calls,
            &tensors,
            Reduction::Sum,
            "all-reduce of the fabric probe",
        )?;
    }
    host_read::f32s_of(&last.f_narrow(0, 0, 1)?)?;
    let own_all_reduce_s = start.elapsed().as_secs_f64() / TIMED_ALL_REDUCES as f64;
    // Per rank: its incoming link's bytes per second and sending rank + 1
    // (0: no link measured), then its all-reduce time.
    let mut gathered = vec![0.0; 3 * world];
    if let Some(link) = incoming {
        gathered[rank] = link.bytes_per_sec;
        gathered[world + rank] = (link.from_rank + 1) as f64;
    }
    gathered[2 * world + rank] = own_all_reduce_s;
    sum_scalars(collective, calls, &mut gathered, "sum of the fabric probe's measurements")?;
    let links = (0..world)
        .filter(|&r| gathered[world + r] >= 1.0)
        .map(|r| LinkSpeed {
            from_rank: gathered[world + r].round() as u64 - 1,
            to_rank: r as u64,
            gb_per_s: gathered[r] / 1e9,
        })
        .collect();
    let all_reduce_s = gathered[2 * world..].iter().copied().fold(0.0, f64::max);
    let probe_bytes = (floats * 4) as u64;
    Ok(Some(FabricProbe {
        epoch,
        step,
        world_size: world as u32,
        probe_bytes,
        all_reduce_s,
        bus_gb_per_s: FabricProbe::bus_bandwidth(probe_bytes, all_reduce_s, world as u32),
        links,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ddp::tests::on_ring;
    use rsb_collective::Single;
    use tch::Device;

    const CPU: Calls = Calls { device: Device::Cpu, at_world_size_one: false };

    #[test]
    fn every_rank_gets_the_same_probe_of_every_link_of_the_ring() {
        let probes = on_ring(3, |ring| probe_fabric(ring, CPU, 1 << 20, 2, 30).unwrap().unwrap());
        let probe = &probes[0];
        for other in &probes[1..] {
            assert_eq!(other, probe);
        }
        assert_eq!((probe.epoch, probe.step, probe.world_size), (2, 30, 3));
        assert_eq!(probe.probe_bytes, 1 << 20);
        let ends: Vec<(u64, u64)> = probe.links.iter().map(|l| (l.from_rank, l.to_rank)).collect();
        assert_eq!(ends, [(2, 0), (0, 1), (1, 2)]);
        for link in &probe.links {
            assert!(link.gb_per_s.is_finite() && link.gb_per_s > 0.0, "{link:?}");
        }
        assert!(probe.all_reduce_s > 0.0 && probe.all_reduce_s < 60.0, "{probe:?}");
        let expected = FabricProbe::bus_bandwidth(1 << 20, probe.all_reduce_s, 3);
        assert_eq!(probe.bus_gb_per_s, expected);
        // Past one bucket (two tensors, the second of one float), and a
        // size rounded up to whole floats; the ranks leave it in step: a sum
        // after it still adds up.
        let results = on_ring(2, |ring| {
            let probe = probe_fabric(ring, CPU, BUCKET_FLOATS * 4 + 3, 0, 0).unwrap().unwrap();
            let mut v = [1.5];
            sum_scalars(ring, CPU, &mut v, "after the probe").unwrap();
            (probe.probe_bytes, probe.links.len(), v[0])
        });
        assert_eq!(results, [((BUCKET_FLOATS * 4 + 4) as u64, 2, 3.0); 2]);
    }

    #[test]
    fn there_is_no_probe_in_one_process_or_of_no_bytes() {
        assert_eq!(probe_fabric(&mut Single, CPU, 1 << 20, 0, 0).unwrap(), None);
        let probes = on_ring(2, |ring| probe_fabric(ring, CPU, 0, 0, 0).unwrap());
        assert_eq!(probes, [None, None]);
    }
}
