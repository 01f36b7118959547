//! The node runtime's commands on the wire: `LoadSpec` ⇄ `LoadStageRequest`,
//! `StartSpec` ⇄ `Start`, and step failures as typed `StepError`s, so the
//! leader and a worker read the same protocol the same way.

use std::net::SocketAddr;

use candle_core::DType;
use strata_proto::v1::{self as pb, load_stage_request::KvBudget as PbBudget};
use strata_types::StageSlot;

use crate::drafter::DraftSpec;
use crate::node::{LoadSpec, StartSpec};
use crate::stage::KvBudget;
use crate::RunnerError;

fn dtype_to_wire(d: DType) -> pb::Dtype {
    match d {
        DType::BF16 => pb::Dtype::Bf16,
        DType::F16 => pb::Dtype::F16,
        DType::F8E4M3 => pb::Dtype::Fp8E4m3,
        _ => pb::Dtype::F32,
    }
}

fn dtype_from_wire(d: i32) -> Result<DType, String> {
    match pb::Dtype::try_from(d) {
        Ok(pb::Dtype::F32) => Ok(DType::F32),
        Ok(pb::Dtype::Bf16) => Ok(DType::BF16),
        Ok(pb::Dtype::F16) => Ok(DType::F16),
        Ok(pb::Dtype::Fp8E4m3) => Ok(DType::F8E4M3),
        _ => Err(format!("unknown dtype {d}")),
    }
}

impl From<&LoadSpec> for pb::LoadStageRequest {
    fn from(s: &LoadSpec) -> Self {
        let kv_budget = Some(match s.budget {
            KvBudget::Bytes(b) => PbBudget::KvCacheBytes(b),
            KvBudget::DeviceFraction {
                fraction,
                max_batch_tokens,
            } => PbBudget::GpuMemoryUtilization(pb::DeviceFraction {
                fraction,
                max_num_batched_tokens: max_batch_tokens as u32,
            }),
        });
        Self {
            slots: s.slots.iter().map(Into::into).collect(),
            kv_budget,
            max_model_len: s.max_model_len as u32,
            dtype: dtype_to_wire(s.dtype) as i32,
            kv_dtype: dtype_to_wire(s.kv_dtype) as i32,
            nccl_id: s.nccl_id.clone().unwrap_or_default(),
            draft_model: s
                .draft
                .as_ref()
                .map(|d| d.model.to_string_lossy().into_owned())
                .unwrap_or_default(),
            num_speculative_tokens: s
                .draft
                .as_ref()
                .map_or(0, |d| d.num_speculative_tokens as u32),
            disable_by_batch_size: s
                .draft
                .as_ref()
                .and_then(|d| d.disable_by_batch_size)
                .unwrap_or(0) as u32,
        }
    }
}

impl TryFrom<pb::LoadStageRequest> for LoadSpec {
    type Error = String;
    fn try_from(r: pb::LoadStageRequest) -> Result<Self, String> {
        let slots = r
            .slots
            .iter()
            .map(StageSlot::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        if slots.is_empty() {
            return Err("no stage to load".into());
        }
        let budget = match r.kv_budget {
            Some(PbBudget::KvCacheBytes(b)) => KvBudget::Bytes(b),
            Some(PbBudget::GpuMemoryUtilization(f)) => KvBudget::DeviceFraction {
                fraction: f.fraction,
                max_batch_tokens: f.max_num_batched_tokens as usize,
            },
            None => return Err("no KV budget".into()),
        };
        Ok(Self {
            slots,
            budget,
            max_model_len: r.max_model_len as usize,
            dtype: dtype_from_wire(r.dtype)?,
            kv_dtype: dtype_from_wire(r.kv_dtype)?,
            nccl_id: (!r.nccl_id.is_empty()).then_some(r.nccl_id),
            draft: (!r.draft_model.is_empty()).then(|| DraftSpec {
                model: r.draft_model.into(),
                num_speculative_tokens: r.num_speculative_tokens as usize,
                disable_by_batch_size: (r.disable_by_batch_size > 0)
                    .then_some(r.disable_by_batch_size as usize),
            }),
        })
    }
}

impl StartSpec {
    pub fn to_wire(&self, epoch: u64) -> pb::Start {
        pb::Start {
            num_blocks: self.num_blocks as u64,
            next_data_addr: self.next.map(|a| a.to_string()).unwrap_or_default(),
            has_previous: self.has_previous,
            epoch,
            comm_ring: self.ring.iter().map(ToString::to_string).collect(),
        }
    }
}

impl TryFrom<&pb::Start> for StartSpec {
    type Error = String;
    fn try_from(s: &pb::Start) -> Result<Self, String> {
        let next = match s.next_data_addr.as_str() {
            "" => None,
            a => Some(
                a.parse()
                    .map_err(|e| format!("next data address {a}: {e}"))?,
            ),
        };
        let ring = s
            .comm_ring
            .iter()
            .map(|a| a.parse::<SocketAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tensor-parallel ring: {e}"))?;
        Ok(Self {
            num_blocks: s.num_blocks as usize,
            next,
            has_previous: s.has_previous,
            ring,
        })
    }
}

impl From<&RunnerError> for pb::StepError {
    fn from(e: &RunnerError) -> Self {
        let kind = match e {
            RunnerError::Link(_) => pb::step_error::Kind::Link,
            _ => pb::step_error::Kind::Failed,
        };
        Self {
            kind: kind as i32,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::LayerRange;

    #[test]
    fn a_load_spec_survives_the_wire() {
        let slot = StageSlot {
            stage: 1,
            layers: LayerRange::new(4, 8),
            tp_size: 2,
            tp_rank_begin: 1,
            tp_rank_count: 1,
        };
        let draft = DraftSpec {
            model: "/models/draft.gguf".into(),
            num_speculative_tokens: 4,
            disable_by_batch_size: Some(8),
        };
        for (budget, draft) in [
            (KvBudget::Bytes(123 << 20), None),
            (
                KvBudget::DeviceFraction {
                    fraction: 0.9,
                    max_batch_tokens: 2048,
                },
                Some(draft),
            ),
        ] {
            let spec = LoadSpec {
                slots: vec![slot],
                budget,
                max_model_len: 4096,
                dtype: DType::BF16,
                kv_dtype: DType::F8E4M3,
                nccl_id: Some(vec![1, 2, 3]),
                draft,
            };
            let back = LoadSpec::try_from(pb::LoadStageRequest::from(&spec)).unwrap();
            assert_eq!(back, spec);
        }
    }

    #[test]
    fn a_bad_load_request_names_what_is_wrong() {
        let mut req = pb::LoadStageRequest::from(&LoadSpec {
            slots: vec![StageSlot {
                stage: 0,
                layers: LayerRange::new(0, 2),
                tp_size: 1,
                tp_rank_begin: 0,
                tp_rank_count: 1,
            }],
            budget: KvBudget::Bytes(1 << 20),
            max_model_len: 64,
            dtype: DType::F32,
            kv_dtype: DType::F32,
            draft: None,
            nccl_id: None,
        });
        req.dtype = 99;
        assert!(LoadSpec::try_from(req.clone())
            .unwrap_err()
            .contains("dtype"));
        req.dtype = pb::Dtype::F32 as i32;
        req.kv_budget = None;
        assert!(LoadSpec::try_from(req).unwrap_err().contains("KV budget"));
    }

    #[test]
    fn a_start_survives_the_wire_and_link_failures_keep_their_kind() {
        let spec = StartSpec {
            num_blocks: 77,
            next: Some("127.0.0.1:9000".parse().unwrap()),
            has_previous: true,
            ring: vec![
                "10.0.0.1:7000".parse().unwrap(),
                "10.0.0.2:7001".parse().unwrap(),
            ],
        };
        assert_eq!(StartSpec::try_from(&spec.to_wire(5)).unwrap(), spec);
        let link = pb::StepError::from(&RunnerError::Link("to the next node: reset".into()));
        assert_eq!(link.kind, pb::step_error::Kind::Link as i32);
        let failed = pb::StepError::from(&RunnerError::Setup("x".into()));
        assert_eq!(failed.kind, pb::step_error::Kind::Failed as i32);
    }
}
