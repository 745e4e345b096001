//! The agreement between ranks before a pass or a load: every rank learns whether any refused,
//! whether all made the same call (`Call`) with the same configuration, and each rank's value.

use super::PartialFc;
use crate::backend::{Backend, Collective, ReduceOp};
use crate::config::LayerConfig;
use crate::error::{PfcError, Result};

/// 64-bit FNV-1a of `text`, folded to its low `bits` bits (at most 24, so that an agreement's
/// f32 slot holds it exactly): a hash stable across processes and builds (no random keys), for
/// what ranks compare through an agreement.
pub(crate) fn fnv1a_bits(text: &str, bits: u32) -> u32 {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    ((hash ^ (hash >> bits) ^ (hash >> (2 * bits))) & ((1 << bits) - 1)) as u32
}

/// FNV-1a of the fields the ranks must share: those that size a rank's collectives (the batch
/// and embedding shapes, the shard split, the wire dtypes; for a prediction also its k) and
/// those that define the loss and the update (margin, sampler, optimizer, update mode: ranks
/// that differed there would train a classifier no configuration describes), folded to
/// [`FINGERPRINT_BITS`] (an f32 holds it exactly, times 32 plus five flag bits: `agree`). The sample
/// rate, the seed and the GEMM precision may differ between ranks. Computed once, at
/// construction; [`call_fingerprint`] adds the call's k.
pub(super) fn config_fingerprint(c: &LayerConfig) -> u32 {
    let shared = format!(
        "{} {} {} {:?} {:?} {}",
        c.num_classes,
        c.dim,
        c.batch_per_rank,
        c.wire,
        c.grad_wire,
        crate::checkpoint::recorded_config(c)
    );
    fnv1a_bits(&shared, FINGERPRINT_BITS)
}

/// Bits of a configuration's fingerprint in an agreement slot: with the call's code
/// ([`Call::CODE_BITS`]) and the refusal bit, 24 bits, every integer an f32 holds exactly.
const FINGERPRINT_BITS: u32 = 24 - Call::CODE_BITS - 1;

/// What a training pass compares besides the configuration: the gradient scale
/// (`set_grad_scale`), the optimizer's update count and the passes pending since the last step.
/// Ranks that step, `discard_grad` or drop a sum (new weights) together keep these equal; a rank
/// that did so alone would otherwise train on from another state without an error.
#[derive(Clone, Copy)]
pub(super) struct TrainingState {
    pub grad_scale: f32,
    pub optimizer_steps: u64,
    pub pending_passes: u64,
}

/// The configuration's fingerprint as a call compares it; a training pass also hashes in the
/// [`TrainingState`].
fn call_fingerprint(folded: u32, call: Call, state: TrainingState) -> u32 {
    match call {
        Call::Drawn
        | Call::Given
        | Call::Accumulate
        | Call::Weighted
        | Call::AccumulateWeighted
        | Call::Margined { .. } => {
            let text = format!(
                "grad_scale {:08x} updates {} pending {}",
                state.grad_scale.to_bits(),
                state.optimizer_steps,
                state.pending_passes
            );
            folded ^ fnv1a_bits(&text, FINGERPRINT_BITS)
        }
        // k sizes the prediction's all-gathers: compared exactly (its low 8 bits, k - 1 for k in
        // 1..=TOP_K_MAX = 256), not hashed, so two valid k can never collide (a rank with another
        // k refuses it anyway); 11 bits of hash remain.
        Call::Predict { k } | Call::PredictAll { k } => {
            (folded & !0xff) | ((k.wrapping_sub(1) & 0xff) as u32)
        }
        _ => folded,
    }
}

// k - 1 must fit the 8 bits call_fingerprint gives it.
const _: () = assert!(crate::cpu::top_k::TOP_K_MAX <= 256);

/// Largest value a rank contributes to an agreement ([`PartialFc::agree`]): 2^24, every integer
/// up to which an f32 holds exactly (a sum with zeros keeps it exact).
const AGREED_VALUE_MAX: u32 = 1 << 24;

/// Which call a pass is. Each pairs its own sequence of collectives, so ranks must all make the
/// same one: `agree_on_input` tells them apart and refuses a mix on every rank.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Call {
    /// `forward_backward`: the sample is drawn.
    Drawn,
    /// `forward_backward_with_sample`: a second agreement follows (the sample's positives).
    Given,
    /// `predict_top_k` with this k.
    Predict { k: usize },
    /// `load_resharded`: the ranks agree after their checks, before any layer changes.
    Load,
    /// `forward_backward_accumulate`: drawn, its gradient added to the pending one.
    Accumulate,
    /// `predict_top_k_all` with this k: the ranks exchange their chunk counts, then each chunk
    /// is a `Predict`.
    PredictAll { k: usize },
    /// `forward_backward_weighted`: drawn, with an all-gather of the rows' weights.
    Weighted,
    /// `forward_backward_accumulate_weighted`: an `Accumulate` with the rows' weights.
    AccumulateWeighted,
    /// `forward_backward_with` with per-row margins: drawn, with an all-gather of the rows'
    /// margin table before the softmax; accumulated and weighted as the flags say.
    Margined { accumulate: bool, weighted: bool },
    /// `save_set`: the ranks agree that every rank's file is written (and which set it is)
    /// before any is renamed.
    Save,
    /// `save_set`'s second agreement: every rank renamed its file, so the backups may go.
    SaveCommit,
}

impl Call {
    const fn code(self) -> u32 {
        match self {
            Call::Drawn => 0,
            Call::Given => 1,
            Call::Predict { .. } => 2,
            Call::Load => 3,
            Call::Accumulate => 4,
            Call::PredictAll { .. } => 5,
            Call::Weighted => 6,
            Call::AccumulateWeighted => 7,
            Call::Margined {
                accumulate,
                weighted,
            } => 8 + 2 * accumulate as u32 + weighted as u32,
            Call::Save => 12,
            Call::SaveCommit => 13,
        }
    }

    /// Bits of a call's code in an agreement slot (`flags >> 1 & CODE_MASK`): codes 0 to 13
    /// name the calls, up to 15 fit.
    const CODE_BITS: u32 = 4;
    const CODE_MASK: u32 = (1 << Self::CODE_BITS) - 1;

    fn name(code: u32) -> &'static str {
        match code {
            0 => "forward_backward",
            1 => "forward_backward_with_sample",
            2 => "predict_top_k",
            3 => "load_resharded",
            4 => "forward_backward_accumulate",
            5 => "predict_top_k_all",
            6 => "forward_backward_weighted",
            7 => "forward_backward_accumulate_weighted",
            8 => "forward_backward_with (per-row margins)",
            9 => "forward_backward_with (per-row margins, weights)",
            10 => "forward_backward_with (per-row margins, accumulate)",
            11 => "forward_backward_with (per-row margins, weights, accumulate)",
            12 => "save_set",
            13 => "save_set (renames)",
            _ => "an unknown call",
        }
    }
}

// Every code fits its field.
const _: () = assert!(
    Call::Margined {
        accumulate: true,
        weighted: true
    }
    .code()
        <= Call::CODE_MASK
);

impl<B: Backend, C: Collective<B>> PartialFc<B, C> {
    /// Every rank learns whether any rank's input was bad, so that all of them stop together
    /// instead of leaving the good ranks waiting in a collective (nothing has been modified yet),
    /// and how many real rows the gathered batch holds. Returns that count.
    ///
    /// `call`: which call this pass is (`Call`); ranks on different calls would pair different
    /// collectives, so they are told apart here and refused together.
    pub(crate) fn agree_on_input(
        &mut self,
        own: Option<PfcError>,
        rows: usize,
        call: Call,
    ) -> Result<usize> {
        // rows <= batch_per_rank <= 2^24: LayerConfig::validate.
        let counts = self.agree(own, rows as u32, call)?;
        Ok(counts.iter().map(|&c| c as usize).sum())
    }

    /// [`agree_on_input`](Self::agree_on_input)'s exchange: besides the refusals, each rank
    /// contributes one `value` (at most [`AGREED_VALUE_MAX`], exact in f32) and every rank gets
    /// all of them, in rank order: a pass's row counts, or `load_resharded`'s identity of the
    /// files each rank loaded.
    pub(crate) fn agree(
        &mut self,
        own: Option<PfcError>,
        value: u32,
        call: Call,
    ) -> Result<Vec<u32>> {
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        // Slots [0, k): "rank r rejected its input"; [k, 2k): rank r's row count. row_loss holds
        // N·k >= 2k floats whenever N >= 2; a single-row layer exchanges through row_max too.
        // Each rank's slot also carries a 19-bit fingerprint of the configuration its buffers
        // and collectives were sized by, and which call it made (4 bits; 24 bits in all: exact
        // in f32, and a sum with zeros leaves it exact): ranks built with different
        // configurations would pair collectives of different sizes.
        let state = TrainingState {
            grad_scale: self.grad_scale,
            optimizer_steps: self.optimizer_step,
            pending_passes: self.pending_passes,
        };
        let fingerprint = call_fingerprint(self.fingerprint, call, state);
        let mut flags = vec![0.0f32; 2 * world];
        flags[rank] = ((fingerprint << (Call::CODE_BITS + 1))
            + (call.code() << 1)
            + u32::from(own.is_some())) as f32;
        flags[world + rank] = value.min(AGREED_VALUE_MAX) as f32;
        let (first, second) = flags.split_at(world);
        let exchanged = (|| {
            let (b, x) = (&self.backend, &mut self.bufs);
            b.upload(first, &mut x.row_loss)?;
            b.upload(second, &mut x.row_max)?;
            self.comm
                .all_reduce_f32(b, &mut x.row_loss, world, ReduceOp::Sum)?;
            self.comm
                .all_reduce_f32(b, &mut x.row_max, world, ReduceOp::Sum)?;
            Ok::<_, PfcError>((
                b.download(&x.row_loss, world)?,
                b.download(&x.row_max, world)?,
            ))
        })();
        // This rank's part of the agreement failed: its peers may be waiting in it, or may have
        // its result and go on without this rank. Break the group so they fail too.
        let (rejected, counts) = match exchanged {
            Ok(flags) => flags,
            Err(e) => {
                self.comm.abort(&format!(
                    "rank {rank}'s agreement on {} failed: {e}",
                    Call::name(call.code())
                ));
                return Err(e);
            }
        };
        if let Some(r) = rejected
            .iter()
            .position(|&f| ((f as u32) >> 1) & Call::CODE_MASK != call.code())
        {
            return Err(PfcError::Collective(format!(
                "rank {r} called {} while rank {rank} called {}: every rank must make the same \
                 call; no rank took the step",
                Call::name(((rejected[r] as u32) >> 1) & Call::CODE_MASK),
                Call::name(call.code())
            )));
        }
        if let Some(r) = rejected
            .iter()
            .position(|&f| (f as u32) >> (Call::CODE_BITS + 1) != fingerprint)
        {
            return Err(PfcError::Collective(format!(
                "rank {r}'s layer configuration differs from rank {rank}'s (num_classes, dim, \
                 batch_per_rank, wire, grad_wire, margin, sampler, optimizer and update mode must \
                 agree{}); no rank took the step",
                match call {
                    Call::Predict { .. } | Call::PredictAll { .. } => ", and predict_top_k's k",
                    Call::Load | Call::Save | Call::SaveCommit => "",
                    _ => {
                        "; so must the gradient scale of set_grad_scale, the optimizer's update \
                         count and the passes pending since the last step: did a rank step, \
                         discard_grad or replace its weights alone?"
                    }
                }
            )));
        }
        if let Some(err) = own {
            return Err(err);
        }
        match rejected.iter().position(|&f| (f as u32) & 1 != 0) {
            Some(r) if call == Call::Load => Err(PfcError::Collective(format!(
                "rank {r} could not load the checkpoint files (its own error says why); no \
                 rank's layer changed"
            ))),
            Some(r) if call == Call::Save => Err(PfcError::Collective(format!(
                "rank {r} could not write its checkpoint file (its own error says why); no rank \
                 renamed its file into place, and each removed its temporary one"
            ))),
            Some(r) if call == Call::SaveCommit => Err(PfcError::Collective(format!(
                "rank {r} could not rename its checkpoint file into place (its own error says \
                 why); every rank puts back the file it had replaced"
            ))),
            Some(r) => Err(PfcError::Collective(format!(
                "rank {r} rejected its input; no rank took the step"
            ))),
            None => Ok(counts.iter().map(|&c| c as u32).collect()),
        }
    }
}
