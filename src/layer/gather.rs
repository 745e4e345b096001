//! The embedding all-gather: this rank's rows and labels packed in the wire format, gathered
//! from every rank and normalized on arrival.

use super::buffers::Packed;
use super::PartialFc;
use crate::backend::{Backend, Collective};
use crate::error::Result;

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// All-gathers this rank's rows and labels into every rank's `x_hat` (normalized),
    /// `x_norms` and `gathered_labels`: packed on the host (padding rows are zeros with label
    /// −1), one upload, one all-gather, and one kernel that unpacks the gathered rows straight
    /// into their normalized copy.
    pub(super) fn gather_rows(&mut self, embeddings: &[f32], labels: &[i64]) -> Result<()> {
        let (b, x) = (&self.backend, &mut self.bufs);
        let d = self.config.dim;
        let n = self.config.batch_per_rank;
        let m = n * self.comm.world_size();
        let wire = self.config.wire;
        match &mut x.packed {
            Packed::F32(send, recv) => {
                let row = crate::cpu::wire::packed_row_len_f32(d);
                let mut host = vec![0f32; n * row];
                crate::cpu::wire::pack_embeddings_f32(
                    embeddings,
                    labels,
                    labels.len(),
                    d,
                    &mut host,
                );
                for pad in host.chunks_exact_mut(row).skip(labels.len()) {
                    pad[d] = f32::from_bits(u32::MAX);
                    pad[d + 1] = f32::from_bits(u32::MAX);
                }
                b.upload(&host, send)?;
                self.comm.all_gather(b, send, n * row, recv)?;
                b.unpack_normalize_f32(
                    recv,
                    m,
                    d,
                    &mut x.gathered_labels,
                    &mut x.x_hat,
                    &mut x.x_norms,
                )?;
            }
            Packed::Half(send, recv) => {
                let row = crate::cpu::wire::packed_row_len(d);
                let mut host = vec![0u16; n * row];
                crate::cpu::wire::pack_embeddings(
                    embeddings,
                    labels,
                    labels.len(),
                    d,
                    wire,
                    &mut host,
                );
                for pad in host.chunks_exact_mut(row).skip(labels.len()) {
                    pad[d..].fill(u16::MAX);
                }
                b.upload(&host, send)?;
                self.comm.all_gather(b, send, n * row, recv)?;
                b.unpack_normalize(
                    recv,
                    m,
                    d,
                    wire,
                    &mut x.gathered_labels,
                    &mut x.x_hat,
                    &mut x.x_norms,
                )?;
            }
        }
        Ok(())
    }
}
