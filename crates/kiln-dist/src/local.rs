//! One process: every collective is a copy (or nothing).

use crate::Comm;
use anyhow::{ensure, Result};
use std::sync::Arc;

pub struct Local;

impl Comm for Local {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }

    fn reduce_scatter_v_sum(&self, buf: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(counts == [buf.len()] && buf.len() == out.len(), "reduce_scatter_v ({what}): counts {counts:?}");
        out.copy_from_slice(buf);
        Ok(())
    }

    fn all_gather_v(&self, chunk: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(counts == [chunk.len()] && chunk.len() == out.len(), "all_gather_v ({what}): counts {counts:?}");
        out.copy_from_slice(chunk);
        Ok(())
    }

    fn all_to_allv(&self, send: &[f32], sc: &[usize], recv: &mut [f32], rc: &[usize], what: &str) -> Result<()> {
        ensure!(sc == [send.len()] && rc == [recv.len()] && send.len() == recv.len(), "all_to_allv ({what}): counts");
        recv.copy_from_slice(send);
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

    fn split(&self, _: usize, _: &str) -> Result<Arc<dyn Comm>> {
        Ok(Arc::new(Local))
    }
}
