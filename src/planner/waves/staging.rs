//! Staging a wave's devices: each chosen device gets an operation for the wave's image that
//! fits its hardware. What to stage is decided first (which image, who is refused and why,
//! who waits for trust); the operations are then written in steps of at most
//! [`STEP_DEVICES`] devices, and the wave's own record of the change (a rollout's record and
//! the devices it deferred) goes in the last of them. A rollout of up to that many devices is
//! one write: a crash leaves it done or not begun. A larger one commits its earlier steps
//! first; a crash between them leaves those devices staged (and counted: members are
//! rebuilt from the operations at open) without the record, and running the rollout again
//! stages the rest.

use std::sync::Arc;

use tracing::info;

use super::{pick, Book, Idx, ImageMeta, Refused, Wave, WaveError, Waves, MAIN_COMPONENT, WAVE_WEIGHT};
use crate::store::Cf;

/// Devices staged per step (each step's batch holds their operations).
const STEP_DEVICES: usize = 20_000;

/// What a staging will do.
pub(super) struct Staging {
    /// Each device to stage, with its index and image.
    pub planned: Vec<(Idx, String, Arc<ImageMeta>)>,
    pub refused: Vec<Refused>,
    /// Refused only until trust is back: staged after the next successful TUF refresh.
    pub deferred: Vec<String>,
}

impl Waves {
    /// Decides, for each chosen device, the image it gets or why it gets none. Writes nothing.
    pub(super) fn plan_stage(&self, wave: &Wave, chosen: &[(Idx, String)], now: u64) -> Staging {
        let (images, why) = self.images(wave, now);
        let mut out = Staging { planned: Vec::with_capacity(chosen.len()), refused: Vec::new(), deferred: Vec::new() };
        for (i, id) in chosen {
            let Some(hardware) = self.fleet.hardware(id) else {
                out.refused.push(Refused { device: id.clone(), reason: "unknown device".into() });
                continue;
            };
            match pick(&images, hardware.as_deref()) {
                Ok(m) => out.planned.push((*i, id.clone(), m.clone())),
                Err(_) if images.is_empty() => {
                    let reason = match &why {
                        Some(d) if d.transient => {
                            out.deferred.push(id.clone());
                            format!("{d}; staged after the next successful TUF refresh")
                        }
                        Some(d) => d.reason.clone(),
                        None => "no image of the wave's version".into(),
                    };
                    out.refused.push(Refused { device: id.clone(), reason });
                }
                Err(reason) => out.refused.push(Refused { device: id.clone(), reason }),
            }
        }
        out
    }

    /// Writes a staging's operations in steps, `record` (the wave as the change leaves it)
    /// with the last; memory follows each committed step. Returns how many were staged.
    pub(super) fn commit_stage(
        &self,
        book: &mut Book,
        wave: &Wave,
        plan: &Staging,
        record: Option<&Wave>,
        now: u64,
    ) -> Result<usize, WaveError> {
        let origin = wave.origin();
        // At least one step: a record goes even when nothing is staged.
        let chunks: Vec<&[(Idx, String, Arc<ImageMeta>)]> =
            if plan.planned.is_empty() { vec![&[]] } else { plan.planned.chunks(STEP_DEVICES).collect() };
        let steps = chunks.len();
        let mut staged = 0;
        for (k, chunk) in chunks.into_iter().enumerate() {
            let mut step = self.planner.step();
            for (_, id, meta) in chunk {
                step.push(id, MAIN_COMPONENT, meta, WAVE_WEIGHT, &origin, now);
            }
            if let Some(w) = record.filter(|_| k + 1 == steps) {
                step.batch().put_json(Cf::Waves, w.name.as_bytes(), w)?;
            }
            step.commit()?;
            let members = book.members.entry(wave.name.clone()).or_default();
            for (i, ..) in chunk {
                members.insert(*i);
            }
            staged += chunk.len();
            if steps > 1 {
                info!(wave = %wave.name, staged, of = plan.planned.len(), "staging");
            }
        }
        Ok(staged)
    }

    /// Stages the chosen devices (no record of the wave goes with them).
    pub(super) fn stage(
        &self,
        book: &mut Book,
        wave: &Wave,
        chosen: &[(Idx, String)],
        now: u64,
    ) -> Result<(usize, Vec<Refused>, Vec<String>), WaveError> {
        let plan = self.plan_stage(wave, chosen, now);
        let staged = self.commit_stage(book, wave, &plan, None, now)?;
        Ok((staged, plan.refused, plan.deferred))
    }
}
