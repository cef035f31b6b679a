//! NCCL through `NcclComm`: the library loads with every function kiln calls (CI installs it
//! and sets `KILN_REQUIRE_NCCL=1`), and on a GPU the collectives give their definitions'
//! values: on one rank always, on two ranks (grouped calls for uneven counts) where the machine
//! has two GPUs.

use kiln_core::Backend;
use kiln_cuda::{Cuda, NcclComm};
use kiln_dist::{Comm, Local, Threads};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn nccl_loads_with_every_function_kiln_calls() {
    if !kiln_cuda::test_nccl() {
        return;
    }
    let version = kiln_cuda::nccl_version().unwrap();
    let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(parts.len() == 3 && parts[0] == 2 && parts[1] >= 18, "NCCL {version}");
}

/// Runs every buffer collective on the ranks of `host` (rank r on `devices[r]`) and checks
/// the values against their definitions: rank r holds `r + i` at index i.
fn check_collectives(cuda: &Cuda, host: Arc<dyn Comm>) {
    let comm = NcclComm::new(cuda.clone(), host, TIMEOUT).unwrap();
    let (rank, size) = (comm.rank(), comm.size());
    let own = |len: usize| -> Vec<f32> { (0..len).map(|i| (rank + i) as f32).collect() };
    // Σ over ranks of r + i = size·i + size(size−1)/2.
    let summed = |i: usize| (size * i + size * (size - 1) / 2) as f32;

    let mut buf = cuda.upload(&own(5));
    comm.all_reduce_sum(&mut buf, "all_reduce").unwrap();
    assert_eq!(cuda.read(&buf), (0..5).map(summed).collect::<Vec<_>>());

    // Uneven pieces: rank r holds r + 1 values.
    let counts: Vec<usize> = (1..=size).collect();
    let total: usize = counts.iter().sum();
    let start: usize = counts[..rank].iter().sum();
    let mut mine = cuda.zeros(counts[rank]);
    comm.reduce_scatter_v_sum(&cuda.upload(&own(total)), &counts, &mut mine, "reduce_scatter_v").unwrap();
    assert_eq!(cuda.read(&mine), (start..start + counts[rank]).map(summed).collect::<Vec<_>>());

    let mut gathered = cuda.zeros(total);
    comm.all_gather_v(&mine, &counts, &mut gathered, "all_gather_v").unwrap();
    assert_eq!(cuda.read(&gathered), (0..total).map(summed).collect::<Vec<_>>());

    // All-to-all: rank r sends peer p (p + 1) copies of 100r + p.
    let send: Vec<f32> = (0..size).flat_map(|p| vec![(100 * rank + p) as f32; p + 1]).collect();
    let recv_counts = vec![rank + 1; size];
    let mut recv = cuda.zeros(size * (rank + 1));
    let send_counts: Vec<usize> = (1..=size).collect();
    comm.all_to_allv(&cuda.upload(&send), &send_counts, &mut recv, &recv_counts, "all_to_allv").unwrap();
    let expected: Vec<f32> = (0..size).flat_map(|p| vec![(100 * p + rank) as f32; rank + 1]).collect();
    assert_eq!(cuda.read(&recv), expected);

    let group = comm.split(0, "split").unwrap();
    let mut buf = cuda.upload(&[1.0]);
    group.all_reduce_sum(&mut buf, "after split").unwrap();
    assert_eq!(cuda.read(&buf), [size as f32]);
}

#[test]
fn collectives_on_one_gpu() {
    let Some(cuda) = kiln_cuda::test_device() else { return };
    if !kiln_cuda::test_nccl() {
        return;
    }
    check_collectives(&cuda, Arc::new(Local));
}

#[test]
fn collectives_between_two_gpus() {
    if Cuda::device_count() < 2 || !kiln_cuda::test_nccl() {
        eprintln!("two-GPU NCCL test skipped: {} device(s)", Cuda::device_count());
        return;
    }
    let hosts = Threads::new(2, TIMEOUT);
    std::thread::scope(|s| {
        for (rank, host) in hosts.into_iter().enumerate() {
            s.spawn(move || check_collectives(&Cuda::new(rank).unwrap(), Arc::new(host)));
        }
    });
}
