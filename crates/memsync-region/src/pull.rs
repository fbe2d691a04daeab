//! Background pull order: the pluggable [`PullPriority`] and the two
//! built-in orders, [`Sequential`] and [`FollowFaults`], from
//! [`memsync_core::chunks`].

pub use memsync_core::chunks::{FollowFaults, PullPriority, PullView, Sequential};
