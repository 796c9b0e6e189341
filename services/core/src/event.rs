//! The event vocabulary of the outbox: what happened, as a closed set. Strings only on
//! the wire and in the database (`as_str` / `FromStr`).

use std::fmt;
use std::str::FromStr;

/// What an event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A base version was pushed (and its fan-out queued in the same transaction).
    BasePublished,
    /// A patch version was pushed (and its catch-up ports queued).
    PatchPushed,
    /// A port waits for a worker (first time, retry, released lease).
    PortQueued,
    /// A worker leased the port.
    PortStarted,
    /// A port finished with an outcome: succeeded (artifacts) or incompatible (refusals).
    PortCompleted,
    /// A port failed for good (out of attempts, or a final error).
    PortFailed,
    /// A port was cancelled.
    PortCancelled,
    /// A port's quality gate finished (the verdict is in the payload).
    PortEvaluated,
}

impl EventKind {
    /// Every kind, in lifecycle order.
    pub const ALL: [EventKind; 8] = [
        EventKind::BasePublished,
        EventKind::PatchPushed,
        EventKind::PortQueued,
        EventKind::PortStarted,
        EventKind::PortCompleted,
        EventKind::PortFailed,
        EventKind::PortCancelled,
        EventKind::PortEvaluated,
    ];

    /// The wire and stored name (`port.completed`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BasePublished => "base.published",
            EventKind::PatchPushed => "patch.pushed",
            EventKind::PortQueued => "port.queued",
            EventKind::PortStarted => "port.started",
            EventKind::PortCompleted => "port.completed",
            EventKind::PortFailed => "port.failed",
            EventKind::PortCancelled => "port.cancelled",
            EventKind::PortEvaluated => "port.evaluated",
        }
    }

    /// Whether the event is about a port (its subject is `patch@base`).
    pub fn is_port(self) -> bool {
        !matches!(self, EventKind::BasePublished | EventKind::PatchPushed)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event type name that is not one of [`EventKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown event type {0:?}: expected one of base.published, patch.pushed, port.queued, port.started, port.completed, port.failed, port.cancelled, port.evaluated"
)]
pub struct UnknownEventKind(pub String);

impl FromStr for EventKind {
    type Err = UnknownEventKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
        }
        assert!("port.done".parse::<EventKind>().is_err());
        assert!("".parse::<EventKind>().is_err());
    }
}
