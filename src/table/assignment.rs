//! Tables co-partitioned with a flow: reading the partitions an instance is given, dropping
//! those taken back.

use super::{Table, TableError};
use std::hash::Hash;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// The follower's answer to a [`Command`].
pub(super) type Reply = Sender<Result<(), TableError>>;

/// A change of the partitions a table reads, sent to its follower thread.
pub(super) enum Command {
    /// Read these too; the reply comes once they are caught up (or why they cannot be read).
    Assign(Vec<i32>, Reply),
    /// Stop reading these and drop their rows; the reply comes once they are gone.
    Revoke(Vec<i32>, Reply),
}

impl<K, V> Table<K, V>
where
    K: Ord + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Starts reading `partitions` too (those already read are left as they are): their rows come
    /// from the local store, if any, and then from the topic after the store's checkpoint.
    /// Resolves once they are read up to their end offsets as of this call, so a join that runs
    /// after it sees every row committed before the assignment.
    ///
    /// # Errors
    /// A partition the topic does not have, a store that is ahead of the topic, a failed table,
    /// or [`TableError::Closed`].
    pub async fn assign(&self, partitions: &[i32]) -> Result<(), TableError> {
        self.request(partitions, Command::Assign).await
    }

    /// Stops reading `partitions` and drops their rows (a checkpoint keeps them in the local
    /// store, so a later [`assign`](Self::assign) reads only the tail). [`watch`](Self::watch)
    /// reports changes read from the topic, not rows dropped this way.
    ///
    /// # Errors
    /// A failed checkpoint, a failed table, or [`TableError::Closed`].
    pub async fn revoke(&self, partitions: &[i32]) -> Result<(), TableError> {
        self.request(partitions, Command::Revoke).await
    }

    /// A synchronous rebalance listener ([`FlowBuilder::on_rebalance`](crate::flow::FlowBuilder::on_rebalance))
    /// that makes this table read the partitions the flow owns of `input_topic`, for a table
    /// co-partitioned with it: same partition count and the same partitioner, so that a key's
    /// table row and its commands share a partition number (Kafka Streams' co-partitioning rule).
    /// Open the table with [`Partitions::Assigned`](super::Partitions::Assigned).
    ///
    /// On assignment it blocks the flow until the table has read the new partitions to their end
    /// (logging while it waits), so the first command of a partition already sees every row
    /// committed before the assignment. On revocation or loss the table drops those partitions.
    pub fn follow_assignment(
        &self,
        input_topic: &str,
    ) -> impl FnMut(&crate::flow::RebalanceEvent, &mut crate::flow::RebalanceActions<'_>) + Send + 'static {
        use crate::flow::RebalanceEvent;
        let (table, input) = (self.clone(), input_topic.to_string());
        move |event, _| {
            let partitions: Vec<i32> =
                event.partitions().iter().filter(|tp| tp.topic == input).map(|tp| tp.partition).collect();
            if partitions.is_empty() {
                return;
            }
            let (what, command): (_, fn(_, _) -> Command) = match event {
                RebalanceEvent::Assigned(_) => ("read", Command::Assign),
                RebalanceEvent::Revoked(_) | RebalanceEvent::Lost(_) => ("drop", Command::Revoke),
            };
            let replied = table.send(&partitions, command).and_then(|rx| table.wait_logging(&rx, &partitions));
            if let Err(e) = replied {
                tracing::error!(topic = %table.topic(), ?partitions, error = %e, "the table could not {what} the flow's partitions");
            }
        }
    }

    async fn request(&self, partitions: &[i32], command: fn(Vec<i32>, Reply) -> Command) -> Result<(), TableError> {
        let rx = self.send(partitions, command)?;
        let replied = tokio::task::spawn_blocking(move || rx.recv().ok()).await;
        self.reply(replied.ok().flatten())
    }

    /// Waits for the follower's reply on this thread, logging every 10 s while it waits.
    fn wait_logging(&self, rx: &Receiver<Result<(), TableError>>, partitions: &[i32]) -> Result<(), TableError> {
        let started = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => tracing::warn!(
                    topic = %self.topic(),
                    ?partitions,
                    waited_s = started.elapsed().as_secs(),
                    "the flow waits for the table to catch up on its new partitions"
                ),
                Err(RecvTimeoutError::Disconnected) => return self.reply(None),
            }
        }
    }

    fn send(
        &self,
        partitions: &[i32],
        command: fn(Vec<i32>, Reply) -> Command,
    ) -> Result<Receiver<Result<(), TableError>>, TableError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared().commands.send(command(partitions.to_vec(), tx)).map_err(|_| self.stopped())?;
        Ok(rx)
    }

    /// The follower's reply; none means it stopped before replying (the table's error, if any).
    fn reply(&self, reply: Option<Result<(), TableError>>) -> Result<(), TableError> {
        reply.unwrap_or_else(|| Err(self.stopped()))
    }

    fn stopped(&self) -> TableError {
        self.error().unwrap_or(TableError::Closed)
    }
}
