//! What the controller tells its reporters: the only interface between the engine and
//! whatever shows a build (readable lines, `--json`, tests).

use super::attempt::Phase;
use super::record::AttemptRecord;
use crate::protocol::Envelope;

/// Which instance group and attempt an event is about. `group` is `None` when the build
/// runs on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub group: Option<u32>,
    pub attempt: u32,
}

#[derive(Debug, Clone)]
pub enum FarmEvent {
    /// The build is about to rent: its id, commit, and (with several instances) the
    /// projects each instance group covers.
    Started {
        build_id: String,
        commit: String,
        trust: crate::trust::Decision,
        groups: Vec<Vec<String>>,
    },
    /// An attempt moved to a new phase, or says how one goes; `detail` says what happened.
    Phase { origin: Origin, phase: Phase, detail: String },
    /// One of the agent's events, as it sent it.
    Agent { origin: Origin, envelope: Envelope },
    /// An attempt ended.
    AttemptEnded { group: Option<u32>, record: AttemptRecord },
    /// Something the build as a whole says (a warning, teardown on the way out, a re-plan
    /// that found nothing left to do).
    Note { group: Option<u32>, message: String },
}
