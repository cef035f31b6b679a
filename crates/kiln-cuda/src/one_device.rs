//! The communicator of a one-process CUDA run: collectives over one rank are copies on the
//! device (kiln_dist::Local's semantics, on device slices).

use crate::device::Cuda;
use crate::memory::DeviceSlice;
use anyhow::{ensure, Result};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::sync::Arc;

pub struct OneDevice(pub Cuda);

impl Comm<DeviceSlice> for OneDevice {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _: &mut DeviceSlice, _: &str) -> Result<()> {
        Ok(())
    }

    fn reduce_scatter_v_sum(
        &self,
        buf: &DeviceSlice,
        counts: &[usize],
        out: &mut DeviceSlice,
        what: &str,
    ) -> Result<()> {
        ensure!(counts == [buf.len()] && buf.len() == out.len(), "reduce_scatter_v ({what}): counts {counts:?}");
        self.0.copy(out, buf);
        Ok(())
    }

    fn all_gather_v(&self, chunk: &DeviceSlice, counts: &[usize], out: &mut DeviceSlice, what: &str) -> Result<()> {
        ensure!(counts == [chunk.len()] && chunk.len() == out.len(), "all_gather_v ({what}): counts {counts:?}");
        self.0.copy(out, chunk);
        Ok(())
    }

    fn all_to_allv(
        &self,
        send: &DeviceSlice,
        sc: &[usize],
        recv: &mut DeviceSlice,
        rc: &[usize],
        what: &str,
    ) -> Result<()> {
        ensure!(sc == [send.len()] && rc == [recv.len()] && send.len() == recv.len(), "all_to_allv ({what}): counts");
        self.0.copy(recv, send);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }

    fn all_gather_u64(&self, mine: &[u64], out: &mut [u64], what: &str) -> Result<()> {
        ensure!(mine.len() == out.len(), "all_gather ({what}): {} values into {}", mine.len(), out.len());
        out.copy_from_slice(mine);
        Ok(())
    }

    fn all_to_all_u64(&self, send: &[u64], recv: &mut [u64], what: &str) -> Result<()> {
        ensure!(send.len() == recv.len(), "all_to_all ({what}): {} values into {}", send.len(), recv.len());
        recv.copy_from_slice(send);
        Ok(())
    }

    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }

    fn split(&self, _: usize, _: &str) -> Result<Arc<dyn Comm<DeviceSlice>>> {
        Ok(Arc::new(OneDevice(self.0.clone())))
    }
}
