//! A forward pass's input (a flattened batch over the paged KV cache), its
//! output, and what every layer derives from the input once per pass.

use candle_core::{Device, Tensor};
use strata_types::BLOCK_SIZE;

use crate::error::Result;

/// One sequence's slice of a flattened batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqInfo<'a> {
    /// Tokens of this sequence in the batch (they are contiguous, in order).
    pub query_len: usize,
    /// Physical blocks holding the sequence's KV, in position order.
    pub block_table: &'a [u32],
}

/// A flattened batch: the new tokens of every scheduled sequence, one after
/// another (prefill chunks and decodes alike).
#[derive(Debug, Clone, Copy)]
pub struct BatchInput<'a> {
    pub token_ids: &'a [u32],
    pub positions: &'a [u32],
    /// Cache slot (`block * BLOCK_SIZE + offset`) of each token.
    pub slot_mapping: &'a [u32],
    pub seqs: &'a [SeqInfo<'a>],
    /// Rows of the batch whose logits the last stage returns.
    pub logits_indices: &'a [u32],
}

#[derive(Debug)]
pub enum StageOutput {
    /// `[tokens, hidden]` for the next stage.
    Hidden(Tensor),
    /// `[logits_indices.len(), vocab]`.
    Logits(Tensor),
}

/// One sequence's `tokens` at positions `start..` of its blocks `table`:
/// the input of [`StageModel::forward_sequence`](crate::StageModel::forward_sequence).
pub(crate) struct OneSequence {
    positions: Vec<u32>,
    slots: Vec<u32>,
    logits_indices: Vec<u32>,
}

impl OneSequence {
    pub(crate) fn new(table: &[u32], start: usize, len: usize, all_logits: bool) -> Self {
        let positions: Vec<u32> = (start..start + len).map(|p| p as u32).collect();
        let slots = positions
            .iter()
            .map(|&p| table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32)
            .collect();
        let logits_indices = if all_logits {
            (0..len as u32).collect()
        } else {
            vec![len.saturating_sub(1) as u32]
        };
        Self {
            positions,
            slots,
            logits_indices,
        }
    }

    pub(crate) fn run<R>(
        &self,
        table: &[u32],
        tokens: &[u32],
        f: impl FnOnce(&BatchInput) -> R,
    ) -> R {
        let seqs = [SeqInfo {
            query_len: tokens.len(),
            block_table: table,
        }];
        f(&BatchInput {
            token_ids: tokens,
            positions: &self.positions,
            slot_mapping: &self.slots,
            seqs: &seqs,
            logits_indices: &self.logits_indices,
        })
    }
}

/// What every layer's attention reads about the batch, derived once per pass.
pub(crate) struct Batch<'a> {
    pub input: &'a BatchInput<'a>,
    /// The sequence (index into `input.seqs`) of each token.
    pub token_seq: Vec<u32>,
    pub block_tables: Vec<&'a [u32]>,
    /// The same as tensors, for the kernels (device-layout cache only).
    pub device: Option<DeviceInputs>,
}

/// The batch's indices as the kernels read them, uploaded once per pass.
pub(crate) struct DeviceInputs {
    pub positions: Tensor,
    pub slots: Tensor,
    pub token_seq: Tensor,
    /// `[seqs, max_blocks]`, short tables padded with block 0 (never read:
    /// a token reads only the blocks up to its position).
    pub block_tables: Tensor,
    /// The rows of long prefill chunks, for the tensor-core kernel.
    pub prefill: Option<strata_kernels::PrefillTiles>,
}

impl<'a> Batch<'a> {
    /// `device`: also upload the indices there, for the kernels.
    pub fn new(input: &'a BatchInput<'a>, device: Option<&Device>) -> Result<Self> {
        let mut token_seq = Vec::with_capacity(input.positions.len());
        for (s, seq) in input.seqs.iter().enumerate() {
            token_seq.extend(std::iter::repeat_n(s as u32, seq.query_len));
        }
        let block_tables: Vec<&[u32]> = input.seqs.iter().map(|s| s.block_table).collect();
        let device = match device {
            None => None,
            Some(device) => {
                let max_blocks = block_tables
                    .iter()
                    .map(|t| t.len())
                    .max()
                    .unwrap_or(0)
                    .max(1);
                let mut tables = vec![0u32; block_tables.len() * max_blocks];
                for (row, t) in tables.chunks_mut(max_blocks).zip(&block_tables) {
                    row[..t.len()].copy_from_slice(t);
                }
                let query_lens: Vec<usize> = input.seqs.iter().map(|s| s.query_len).collect();
                let prefill = match strata_kernels::PrefillPlan::new(&query_lens) {
                    Some(plan) => Some(plan.upload(device)?),
                    None => None,
                };
                Some(DeviceInputs {
                    prefill,
                    positions: Tensor::new(input.positions, device)?,
                    slots: Tensor::new(input.slot_mapping, device)?,
                    token_seq: Tensor::new(token_seq.as_slice(), device)?,
                    block_tables: Tensor::from_vec(
                        tables,
                        (block_tables.len(), max_blocks),
                        device,
                    )?,
                })
            }
        };
        Ok(Self {
            input,
            token_seq,
            block_tables,
            device,
        })
    }
}
