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

    fn all_reduce_sum_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, chunk: &[f32], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(chunk.len() == out.len(), "all_gather ({what}): {} values into {}", chunk.len(), out.len());
        out.copy_from_slice(chunk);
        Ok(())
    }

    fn reduce_scatter_sum(&self, buf: &[f32], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(buf.len() == out.len(), "reduce_scatter ({what}): {} values into {}", buf.len(), out.len());
        out.copy_from_slice(buf);
        Ok(())
    }

    fn reduce_scatter_v_sum(&self, buf: &[f32], counts: &[usize], out: &mut [f32], what: &str) -> Result<()> {
        ensure!(counts == [buf.len()] && buf.len() == out.len(), "reduce_scatter_v ({what}): counts");
        out.copy_from_slice(buf);
        Ok(())
    }

    fn broadcast(&self, _: &mut [f32], root: usize, what: &str) -> Result<()> {
        ensure!(root == 0, "broadcast ({what}): root {root} of one process");
        Ok(())
    }

    fn all_to_allv(&self, send: &[f32], sc: &[usize], recv: &mut [f32], rc: &[usize], what: &str) -> Result<()> {
        ensure!(sc == [send.len()] && rc == [recv.len()] && send.len() == recv.len(), "all_to_allv ({what}): counts");
        recv.copy_from_slice(send);
        Ok(())
    }

    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }

    fn split(&self, _: usize, _: &str) -> Result<Arc<dyn Comm + Send + Sync>> {
        Ok(Arc::new(Local))
    }
}
