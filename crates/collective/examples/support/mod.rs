//! What the ring benchmarks share: a ring of N ranks on loopback TCP.

use rsb_collective::ring::{RingConfig, RingKey, RingListener, TcpRing};

/// A ring of `n` ranks (threads of this process) on loopback TCP under
/// `config`, one [`TcpRing`] per rank, in rank order.
pub fn form_rings(n: usize, config: &RingConfig) -> Vec<TcpRing> {
    let listeners: Vec<RingListener> =
        (0..n).map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let addresses: Vec<String> =
        listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addresses = addresses.clone();
                s.spawn(move || {
                    let key = RingKey::derive(b"ring benchmark");
                    l.connect(rank, &addresses, &key, config.clone()).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
