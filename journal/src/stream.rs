//! Streams fed by a blocking producer (storage iteration) through a bounded channel.

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Chunk size of replay streams: big enough to amortise the channel, small enough to bound memory.
pub(crate) const CHUNK: usize = 1024;

/// Runs `produce` on tokio's blocking pool when the stream is first polled. `produce` sends items
/// with `blocking_send` and must stop when that fails (the reader went away). The channel holds
/// `depth` items, which is the back-pressure: a slow reader pauses the storage iteration.
pub(crate) fn blocking_stream<T, F>(depth: usize, produce: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) + Send + 'static,
{
    let (tx, rx) = mpsc::channel(depth);
    let start = futures::stream::once(async move {
        tokio::task::spawn_blocking(move || produce(tx));
    })
    .filter_map(|()| async { None });
    start.chain(ReceiverStream::new(rx))
}

/// Collects items into chunks of [`CHUNK`] and sends them; returns false when the reader is gone.
#[derive(Debug)]
pub(crate) struct Chunker<T, E> {
    tx: mpsc::Sender<Result<Vec<T>, E>>,
    buf: Vec<T>,
    /// What the buffered items stand for (an item may expand into several for the reader).
    weight: usize,
}

impl<T, E> Chunker<T, E> {
    pub(crate) fn new(tx: mpsc::Sender<Result<Vec<T>, E>>) -> Self {
        Self { tx, buf: Vec::with_capacity(CHUNK), weight: 0 }
    }

    /// Adds an item; sends a full chunk. False when the reader is gone.
    pub(crate) fn push(&mut self, item: T) -> bool {
        self.push_weighted(item, 1)
    }

    /// Adds an item that stands for `weight` items (at most [`CHUNK`]) once decoded: a chunk never
    /// stands for more than [`CHUNK`]. False when the reader is gone.
    pub(crate) fn push_weighted(&mut self, item: T, weight: usize) -> bool {
        let weight = weight.clamp(1, CHUNK);
        if self.weight + weight > CHUNK && !self.buf.is_empty() && !self.send_buffered() {
            return false;
        }
        self.buf.push(item);
        self.weight += weight;
        if self.weight >= CHUNK {
            return self.send_buffered();
        }
        true
    }

    fn send_buffered(&mut self) -> bool {
        self.weight = 0;
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(chunk)).is_ok()
    }

    /// Sends what is buffered, then the error.
    pub(crate) fn fail(mut self, err: E) {
        if !self.buf.is_empty() && !self.send_buffered() {
            return;
        }
        let _ = self.tx.blocking_send(Err(err));
    }

    /// Sends what is buffered.
    pub(crate) fn finish(mut self) {
        if !self.buf.is_empty() {
            self.send_buffered();
        }
    }
}
