//! A flow's delivery guarantee, as one trait with two implementations (`exactly_once`,
//! `at_least_once`). Each owns its producer's lifecycle and decides how the open work commits,
//! when it must end, and what a failure means; the rest of the engine never asks which one it
//! runs. The engine is generic over it (`Core<S, G>`), so the choice costs no dynamic dispatch per
//! record.

use super::core::{Core, FlowConsumer};
use super::state::PartitionState;
use crate::flow::error::FlowError;
use crate::flow::record::InputRecord;
use crate::stage::EventSourced;

/// How long `advance` may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Not at all: move along what is acknowledged already.
    No,
    /// Until at most this many batches are pending.
    UntilAtMost(usize),
}

/// A delivery guarantee: see the module documentation.
pub(super) trait Guarantee: Sized + Send + 'static {
    /// The producer is transactional (its start initializes transactions and begins the first),
    /// and its acknowledgements are not counted per batch.
    const TRANSACTIONAL: bool;

    /// How many producers it drives (exactly once alternates two transactional producers).
    const PRODUCERS: usize;

    /// The id under which the records produced now are counted (the at-least-once batch being
    /// filled; 0 for a transaction).
    fn batch(&self) -> usize;

    /// One more input in the open work.
    fn took_input(&mut self);

    /// The storage asks the open work to end soon (a key holds the most events one journal
    /// record takes).
    fn end_soon(&mut self);

    /// The open work must end now, whatever the commit interval says (a full batch).
    fn due(&self) -> bool;

    /// A commit is under way: the next may not start yet (the flow goes on processing).
    fn busy(&self) -> bool;

    /// `key`'s new state includes `input`: noted in `part` before the state is journaled, where
    /// the guarantee needs it to skip a redelivery.
    fn applied<S: EventSourced>(&self, part: &mut PartitionState<S>, key: &S::Key, input: &InputRecord);

    /// Commits the open work (or sends it on its way to a commit) and opens the next.
    fn commit<S: EventSourced>(c: &mut Core<S, Self>, consumer: &FlowConsumer<S, Self>) -> Result<(), FlowError>;

    /// Moves work committed earlier along, waiting as `wait` says.
    fn advance<S: EventSourced>(
        c: &mut Core<S, Self>,
        consumer: &FlowConsumer<S, Self>,
        wait: Wait,
    ) -> Result<(), FlowError>;

    /// The one way back from a failure: heals it (and the flow goes on from a consistent point)
    /// or returns it (the flow stops).
    fn recover<S: EventSourced>(
        c: &mut Core<S, Self>,
        consumer: &FlowConsumer<S, Self>,
        e: FlowError,
    ) -> Result<(), FlowError>;

    /// Partitions were lost (another instance may own them already): nothing of the open work
    /// may commit.
    fn lost<S: EventSourced>(c: &mut Core<S, Self>, consumer: &FlowConsumer<S, Self>) -> Result<(), FlowError>;

    /// The flow stops on an error: gives up what the guarantee holds open (the caller drops the
    /// open work's state).
    fn abandon<S: EventSourced>(c: &mut Core<S, Self>);
}
