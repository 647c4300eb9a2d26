//! A bounded fuzz harness for decoders of bytes that come from disk or from Kafka, on stable Rust.
//!
//! The property for every decoder: on any input it returns (`Ok` or `Err`), without panicking,
//! hanging or allocating absurd amounts of memory; on a valid record it gives back what was
//! encoded. Inputs are valid records built through the public API ([`mutated`]'s seed) and their
//! mutations: bit flips, truncations, insertions, spliced copies, numbers and bincode varints
//! written anywhere, JSON tokens, length fields set to huge values ([`Field`]), and, for
//! CRC-protected envelopes, mutations re-sealed with a correct length and CRC ([`reseal`]) so the
//! parser behind the CRC runs.
//!
//! [`Fuzz::run`] runs a property:
//! - `EVENTSTAGE_FUZZ_CASES` cases (default [`DEFAULT_CASES`]), from a fixed seed, so a run is
//!   reproducible; `EVENTSTAGE_FUZZ_SEED=<u64>` picks another one. Failures are not persisted.
//! - a case that runs longer than [`CASE_LIMIT`] fails the test with the input (a hang), instead
//!   of blocking CI;
//! - with [`Tracking`] as the test binary's global allocator, a case that asks for one allocation
//!   above [`ALLOC_LIMIT`] fails (a length read from the input and allocated); one the machine
//!   cannot serve at all aborts the test binary ("memory allocation of N bytes failed"), which
//!   fails too, without the input;
//! - inputs are at most [`MAX_INPUT`] bytes.
//!
//! ```no_run
//! use eventstage_journal::testkit::fuzz::{mutated, Fuzz, Tracking};
//! use eventstage_journal::{CodecId, Envelope};
//! use proptest::prelude::*;
//!
//! #[global_allocator]
//! static ALLOC: Tracking = Tracking;
//!
//! let seed = Envelope::event(CodecId::RAW, 1, 0, b"payload".to_vec()).encode();
//! Fuzz::new("envelope").run(mutated(seed), |bytes| {
//!     let _ = Envelope::decode(&bytes);
//!     Ok(())
//! });
//! ```

use crate::HEADER_LEN;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Cases per property when `EVENTSTAGE_FUZZ_CASES` is not set: the whole harness runs in seconds
/// in a debug build.
pub const DEFAULT_CASES: u32 = 256;
/// The largest input the strategies produce.
pub const MAX_INPUT: usize = 64 << 10;
/// The largest single allocation a case may ask for (inputs are at most [`MAX_INPUT`] bytes).
pub const ALLOC_LIMIT: usize = 64 << 20;
/// How long one case may run before it counts as a hang.
pub const CASE_LIMIT: Duration = Duration::from_secs(10);

/// Cases per property: `EVENTSTAGE_FUZZ_CASES`, else [`DEFAULT_CASES`].
///
/// # Panics
/// When `EVENTSTAGE_FUZZ_CASES` is set but not a number.
pub fn cases() -> u32 {
    match std::env::var("EVENTSTAGE_FUZZ_CASES") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("EVENTSTAGE_FUZZ_CASES={v} is not a number")),
        Err(_) => DEFAULT_CASES,
    }
}

/// The proptest configuration of [`Fuzz::run`]: [`cases`] cases, a fixed seed (or
/// `EVENTSTAGE_FUZZ_SEED`), no failure files, bounded shrinking.
///
/// # Panics
/// When `EVENTSTAGE_FUZZ_SEED` is set but not a number.
pub fn config() -> Config {
    let seed = match std::env::var("EVENTSTAGE_FUZZ_SEED") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("EVENTSTAGE_FUZZ_SEED={v} is not a number")),
        Err(_) => 0x65_76_65_6e_74_73,
    };
    Config {
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 2048,
        max_shrink_time: 60_000,
        ..Config::with_cases(cases())
    }
}

/// A fixed-width integer field of a seed (a length, a count, a sequence number), which
/// [`mutated_with`] sets to interesting values: 0, 1, boundaries, `u32::MAX`, 2^40, `u64::MAX`...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Offset of its first byte in the seed.
    pub at: usize,
    /// 1, 2, 4 or 8 bytes.
    pub width: usize,
    /// Big-endian (storage keys) rather than little-endian (envelopes, entries).
    pub big_endian: bool,
}

impl Field {
    /// A little-endian field.
    pub fn le(at: usize, width: usize) -> Self {
        Self { at, width, big_endian: false }
    }

    /// A big-endian field.
    pub fn be(at: usize, width: usize) -> Self {
        Self { at, width, big_endian: true }
    }
}

/// JSON fragments that parsers get wrong: deep nesting, huge and odd numbers, lone surrogates,
/// escapes, duplicate keys.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "-",
    "-0",
    "1e999999",
    "18446744073709551616",
    "-9223372036854775809",
    "0.0000000000000000000000000000001",
    "\"\\ud800\"",
    "\"\\u0000\"",
    "\"id\":\"x\",\"id\":\"y\"",
    "\"amount\":",
    "\u{feff}",
    "\u{0}",
    "\u{7f}\u{80}\u{ff}",
];

/// One change to a byte string. Positions are [`Index`]es, scaled to the bytes' length when
/// applied, so a mutation stays meaningful while others change the length.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flips one bit.
    Flip {
        /// Which byte.
        at: Index,
        /// Which bit (0..8).
        bit: u8,
    },
    /// Sets one byte.
    Set {
        /// Which byte.
        at: Index,
        /// Its new value.
        byte: u8,
    },
    /// Cuts the bytes off at a position.
    Truncate {
        /// Where.
        at: Index,
    },
    /// Inserts bytes.
    Insert {
        /// Where.
        at: Index,
        /// What.
        bytes: Vec<u8>,
    },
    /// Removes a run of bytes.
    Remove {
        /// From where.
        at: Index,
        /// How many.
        len: u8,
    },
    /// Copies a run of bytes to another position (inserted there).
    Splice {
        /// Copied from.
        from: Index,
        /// Inserted at.
        to: Index,
        /// How many.
        len: u8,
    },
    /// Writes an integer over the bytes at a position.
    Number {
        /// Where: an [`Index`] anywhere, or an absolute offset below 64 (headers).
        at: Position,
        /// The value (its low `width` bytes).
        value: u64,
        /// 1, 2, 4 or 8 bytes.
        width: u8,
        /// Byte order.
        big_endian: bool,
    },
    /// Inserts a bincode 2 varint (how bincode writes lengths).
    Varint {
        /// Where.
        at: Index,
        /// The value.
        value: u64,
    },
    /// Inserts a JSON fragment.
    Token {
        /// Where.
        at: Index,
        /// Which of the fragments.
        token: Index,
        /// Repeated this many times (deep nesting).
        times: u16,
    },
}

/// Where a [`Mutation::Number`] writes.
#[derive(Debug, Clone)]
pub enum Position {
    /// Anywhere.
    Anywhere(Index),
    /// At this offset (when the bytes are that long).
    Offset(u8),
}

/// Integers that break parsers: zero, one, boundaries of every width, 2^40, all ones.
pub fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0,
            1,
            2,
            0x7f,
            0x80,
            0xff,
            0x100,
            0xfb,
            0xfc,
            0xfd,
            0xfe,
            0x7fff,
            0xffff,
            0x1_0000,
            0x7fff_ffff,
            0x8000_0000,
            u64::from(u32::MAX),
            1 << 32,
            1 << 40,
            i64::MAX as u64,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ]),
        1 => any::<u64>(),
    ]
}

/// A random [`Mutation`].
pub fn mutation() -> impl Strategy<Value = Mutation> {
    let width = prop::sample::select(vec![1u8, 2, 4, 8]);
    let position = prop_oneof![any::<Index>().prop_map(Position::Anywhere), (0u8..64).prop_map(Position::Offset)];
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1u8..32).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<Index>(), any::<Index>(), 1u8..64).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        3 => (position, interesting(), width, any::<bool>())
            .prop_map(|(at, value, width, big_endian)| Mutation::Number { at, value, width, big_endian }),
        2 => (any::<Index>(), interesting()).prop_map(|(at, value)| Mutation::Varint { at, value }),
        1 => (any::<Index>(), any::<Index>(), prop_oneof![4 => Just(1u16), 1 => 1u16..400])
            .prop_map(|(at, token, times)| Mutation::Token { at, token, times }),
    ]
}

fn varint(value: u64) -> Vec<u8> {
    match value {
        0..=250 => vec![value as u8],
        251..=0xffff => [&[251u8][..], &(value as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(value as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &value.to_le_bytes()].concat(),
    }
}

fn write_int(bytes: &mut [u8], at: usize, value: u64, width: usize, big_endian: bool) {
    let all = if big_endian { value.to_be_bytes() } else { value.to_le_bytes() };
    let src = if big_endian { &all[8 - width..] } else { &all[..width] };
    let end = (at + width).min(bytes.len());
    if at < end {
        bytes[at..end].copy_from_slice(&src[..end - at]);
    }
}

impl Mutation {
    /// Applies the mutation to `bytes`.
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        match self {
            Mutation::Flip { at, bit } if len > 0 => bytes[at.index(len)] ^= 1 << (bit % 8),
            Mutation::Set { at, byte } if len > 0 => bytes[at.index(len)] = *byte,
            Mutation::Truncate { at } => bytes.truncate(at.index(len + 1)),
            Mutation::Insert { at, bytes: new } => {
                let at = at.index(len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Remove { at, len: n } if len > 0 => {
                let at = at.index(len);
                bytes.drain(at..(at + usize::from(*n)).min(len));
            }
            Mutation::Splice { from, to, len: n } if len > 0 => {
                let from = from.index(len);
                let run = bytes[from..(from + usize::from(*n)).min(len)].to_vec();
                let to = to.index(len + 1);
                bytes.splice(to..to, run);
            }
            Mutation::Number { at, value, width, big_endian } => {
                let width = usize::from(*width).clamp(1, 8);
                let at = match at {
                    Position::Anywhere(i) if len > 0 => i.index(len),
                    Position::Anywhere(_) => return,
                    Position::Offset(o) => usize::from(*o),
                };
                write_int(bytes, at, *value, width, *big_endian);
            }
            Mutation::Varint { at, value } => {
                let at = at.index(len + 1);
                bytes.splice(at..at, varint(*value));
            }
            Mutation::Token { at, token, times } => {
                let at = at.index(len + 1);
                let token = TOKENS[token.index(TOKENS.len())].repeat(usize::from(*times).max(1));
                bytes.splice(at..at, token.into_bytes());
            }
            _ => {}
        }
        bytes.truncate(MAX_INPUT);
    }
}

/// Writes a correct payload length and CRC into the envelope that starts at `at` in `bytes` (the
/// rest of `bytes` is its payload), as a writer would have: a mutation re-sealed like this passes
/// the envelope's checks and reaches the parser behind them. Does nothing when the bytes are
/// shorter than a header.
pub fn reseal(bytes: &mut [u8], at: usize) {
    let Some(env) = bytes.get_mut(at..).filter(|e| e.len() >= HEADER_LEN) else { return };
    let len = u32::try_from(env.len() - HEADER_LEN).unwrap_or(u32::MAX);
    env[16..20].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&env[..20]);
    crc.update(&env[HEADER_LEN..]);
    let sum = crc.finalize();
    env[20..24].copy_from_slice(&sum.to_le_bytes());
}

/// `seed` and its mutations: the seed itself, up to four [`Mutation`]s of it, or random bytes.
pub fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    mutated_with(seed, Vec::new(), None)
}

/// `seed` and its mutations, knowing its structure: see [`Mutations::apply`].
pub fn mutated_with(seed: Vec<u8>, fields: Vec<Field>, envelope: Option<usize>) -> impl Strategy<Value = Vec<u8>> {
    mutations().prop_map(move |m| m.apply(&seed, &fields, envelope))
}

/// What to do to a seed; for seeds known only when the case runs (records a journal wrote), else
/// see [`mutated`].
#[derive(Debug, Clone)]
pub struct Mutations {
    /// Replace the seed with these bytes.
    pub random: Option<Vec<u8>>,
    /// Set the field (picked by the index) to the value, first.
    pub field: Option<(Index, u64)>,
    /// Then apply these.
    pub list: Vec<Mutation>,
    /// Then re-seal the envelope (if there is one).
    pub reseal: bool,
}

impl Mutations {
    /// The mutated seed. With `fields`, half of the mutations set one of them to an
    /// [`interesting`] value first; when the seed holds an envelope starting at `envelope` (the
    /// rest of the seed its payload), half of them are [`reseal`]ed at the end.
    pub fn apply(&self, seed: &[u8], fields: &[Field], envelope: Option<usize>) -> Vec<u8> {
        if let Some(random) = &self.random {
            return random.clone();
        }
        let mut bytes = seed[..seed.len().min(MAX_INPUT)].to_vec();
        if let (Some((which, value)), false) = (&self.field, fields.is_empty()) {
            let f = fields[which.index(fields.len())];
            write_int(&mut bytes, f.at, *value, f.width.clamp(1, 8), f.big_endian);
        }
        for m in &self.list {
            m.apply(&mut bytes);
        }
        if let (true, Some(at)) = (self.reseal, envelope) {
            reseal(&mut bytes, at);
        }
        bytes
    }

    /// True when [`apply`](Self::apply) gives the seed back whatever it is.
    pub fn is_none(&self) -> bool {
        self.random.is_none() && self.field.is_none() && self.list.is_empty()
    }
}

/// Random [`Mutations`]: one in sixteen replaces the seed with random bytes.
pub fn mutations() -> impl Strategy<Value = Mutations> {
    let seeded =
        (prop::collection::vec(mutation(), 0..=4), prop::option::of((any::<Index>(), interesting())), any::<bool>())
            .prop_map(|(list, field, reseal)| Mutations { random: None, field, list, reseal });
    let random = prop::collection::vec(any::<u8>(), 0..256).prop_map(|bytes| Mutations {
        random: Some(bytes),
        field: None,
        list: Vec::new(),
        reseal: false,
    });
    prop_oneof![15 => seeded, 1 => random]
}

thread_local! {
    /// The largest allocation asked for on this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread runs or waits for a fuzz property (its panics and allocations are the
    /// property's own, not another thread's).
    static HARNESS: Cell<bool> = const { Cell::new(false) };
}

static TRACKING: AtomicBool = AtomicBool::new(false);
/// Allocations above [`ALLOC_LIMIT`] on threads that are not the harness's (a decoder's helper
/// threads: a journal's blocking pool).
static HUGE_ELSEWHERE: AtomicUsize = AtomicUsize::new(0);
/// Panics on threads that are not the harness's.
static PANICS_ELSEWHERE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, noting the largest allocation each thread asks for; install it as the
/// test binary's `#[global_allocator]` so that [`Fuzz::run`] can fail a case that allocates more
/// than [`ALLOC_LIMIT`] at once. It never refuses an allocation itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracking;

fn note(size: usize) {
    if !TRACKING.load(Ordering::Relaxed) {
        TRACKING.store(true, Ordering::Relaxed);
    }
    // Const-initialised thread locals without destructors never allocate and are never destroyed:
    // safe to use from the allocator.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    if size > ALLOC_LIMIT && !HARNESS.try_with(Cell::get).unwrap_or(false) {
        HUGE_ELSEWHERE.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` with the same arguments; `note` only touches atomics
// and const-initialised thread locals, neither of which allocates or unwinds.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count_panics_elsewhere() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !HARNESS.try_with(Cell::get).unwrap_or(false) {
                PANICS_ELSEWHERE.fetch_add(1, Ordering::Relaxed);
            }
            previous(info);
        }));
    });
}

/// Runs one fuzz property; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Fuzz {
    name: String,
    elsewhere: bool,
}

/// The input being run and since when, for the hang report.
type Current<V> = Arc<Mutex<Option<(Instant, V)>>>;

impl Fuzz {
    /// A property named `name` (in failure messages).
    pub fn new(name: &str) -> Self {
        Self { name: name.into(), elsewhere: false }
    }

    /// Also fail a case when, while it ran, another thread panicked or allocated more than
    /// [`ALLOC_LIMIT`] at once: for decoders that run on helper threads (a journal's blocking
    /// pool, where a panic becomes an error or a stream that ends early). Only for test binaries
    /// whose other tests run no such threads concurrently. Default: false.
    #[must_use]
    pub fn watch_other_threads(mut self, watch: bool) -> Self {
        self.elsewhere = watch;
        self
    }

    /// Runs `test` on [`config`]`()` cases of `strategy`, on a thread of its own, and fails (with
    /// the input) when a case fails, panics, runs longer than [`CASE_LIMIT`] or allocates more than
    /// [`ALLOC_LIMIT`] at once.
    ///
    /// # Panics
    /// When the property fails, or [`Tracking`] is not the global allocator.
    pub fn run<S, F>(self, strategy: S, test: F)
    where
        S: Strategy + Send + 'static,
        S::Value: Clone + Debug + Send + 'static,
        F: Fn(S::Value) -> Result<(), TestCaseError> + Send + 'static,
    {
        count_panics_elsewhere();
        HARNESS.with(|h| h.set(true));
        let current: Current<S::Value> = Arc::new(Mutex::new(None));
        let (done_tx, done) = mpsc::channel();
        let elsewhere = self.elsewhere;
        let runner_current = current.clone();
        let spawned = std::thread::Builder::new().name(format!("fuzz {}", self.name)).spawn(move || {
            HARNESS.with(|h| h.set(true));
            let mut runner = TestRunner::new(config());
            let result = runner.run(&strategy, |value| {
                *lock(&runner_current) = Some((Instant::now(), value.clone()));
                let outcome = run_case(elsewhere, || test(value));
                *lock(&runner_current) = None;
                outcome
            });
            let _ = done_tx.send(result.map_err(|e| describe(&e)));
        });
        if let Err(e) = spawned {
            panic!("fuzz {}: cannot start its thread: {e}", self.name);
        }
        loop {
            match done.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(())) => break,
                Ok(Err(failure)) => panic!("fuzz {}: {failure}", self.name),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("fuzz {}: its thread died", self.name),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some((since, input)) = lock(&current).as_ref().filter(|(s, _)| s.elapsed() > CASE_LIMIT) {
                        let input = format!("{input:?}");
                        let shown = &input[..input.len().min(4096)];
                        panic!(
                            "fuzz {}: one input has run for {:?} (limit {CASE_LIMIT:?}): a hang? input: {shown}",
                            self.name,
                            since.elapsed()
                        );
                    }
                }
            }
        }
        assert!(
            TRACKING.load(Ordering::Relaxed),
            "fuzz {}: install testkit::fuzz::Tracking as the test binary's #[global_allocator], or allocations are not checked",
            self.name
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn describe<V: Debug>(e: &TestError<V>) -> String {
    match e {
        TestError::Abort(why) => format!("aborted: {why}"),
        TestError::Fail(why, input) => {
            let input = format!("{input:?}");
            format!("{why}\nminimal failing input: {}", &input[..input.len().min(8192)])
        }
    }
}

/// Runs one case with the per-case checks of [`Fuzz::run`].
fn run_case(elsewhere: bool, case: impl FnOnce() -> Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    let (panics, huge) = (PANICS_ELSEWHERE.load(Ordering::Relaxed), HUGE_ELSEWHERE.load(Ordering::Relaxed));
    LARGEST.with(|l| l.set(0));
    let outcome = case();
    outcome?;
    let largest = LARGEST.with(Cell::get);
    if largest > ALLOC_LIMIT {
        return Err(TestCaseError::fail(format!(
            "one allocation of {largest} bytes (limit {ALLOC_LIMIT}): a length read from the input, allocated?"
        )));
    }
    if elsewhere {
        let panics = PANICS_ELSEWHERE.load(Ordering::Relaxed) - panics;
        if panics > 0 {
            return Err(TestCaseError::fail(format!(
                "{panics} panic(s) on another thread (see the panic message above)"
            )));
        }
        if HUGE_ELSEWHERE.load(Ordering::Relaxed) != huge {
            return Err(TestCaseError::fail(format!("another thread allocated more than {ALLOC_LIMIT} bytes at once")));
        }
    }
    Ok(())
}
