//! Fuzz harness of the main crate's decoders of bytes from disk or Kafka (issue 13): Kafka journal
//! entries (also the local state store's rows), the codecs over the example stages' commands,
//! events (with upcasting) and states, the flow's sled outbox, the bank flow's wire JSON and the
//! table decoders. Each runs `EVENTSTAGE_FUZZ_CASES` cases (see
//! `eventstage_journal::testkit::fuzz`); no broker is started.

use eventstage::flow::{InputRecord, OutputRecord, Processed};
use eventstage::journal::testkit::fuzz::{mutated, mutated_with, Field, Fuzz, Tracking};
use eventstage::journal::{Envelope, JournalEntry, SeqNo, SourcePosition, HEADER_LEN};
use eventstage::stages::bank::{Account, Bank, BankCommand, BankEvent, BankRejection, Limited};
use eventstage::stages::bank_flow::{self, BankTopics, WireCommand, WireReply};
use eventstage::stages::inventory::{self, Inventory, InventoryCommand, InventoryEvent, Stock};
use eventstage::table::Decoder;
use eventstage::{Codec, EventSourced};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

// The system allocator, noting each thread's largest allocation for the fuzz cases' check.
#[global_allocator]
static ALLOC: Tracking = Tracking;

fn codec() -> impl Strategy<Value = Codec> {
    prop::sample::select(vec![Codec::Bincode, Codec::Json])
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9-]{1,12}", ".{0,12}"]
}

fn bank_command() -> impl Strategy<Value = BankCommand> {
    prop_oneof![
        Just(BankCommand::Open),
        any::<u64>().prop_map(BankCommand::Deposit),
        any::<u64>().prop_map(BankCommand::Withdraw),
        Just(BankCommand::Close),
    ]
}

fn bank_event() -> impl Strategy<Value = BankEvent> {
    prop_oneof![
        Just(BankEvent::Opened),
        any::<u64>().prop_map(|amount| BankEvent::Deposited { amount }),
        any::<u64>().prop_map(|amount| BankEvent::Withdrawn { amount }),
        Just(BankEvent::Closed),
    ]
}

fn account() -> impl Strategy<Value = Account> {
    (any::<bool>(), any::<u64>()).prop_map(|(open, balance)| Account { open, balance })
}

fn bank_rejection() -> impl Strategy<Value = BankRejection> {
    prop_oneof![
        Just(BankRejection::AlreadyOpen),
        Just(BankRejection::NotOpen),
        (any::<u64>(), any::<u64>())
            .prop_map(|(balance, requested)| BankRejection::InsufficientFunds { balance, requested }),
        any::<u64>().prop_map(|balance| BankRejection::NonZeroBalance { balance }),
        Just(BankRejection::Overflow),
        (any::<u64>(), any::<u64>()).prop_map(|(limit, requested)| BankRejection::OverLimit { limit, requested }),
    ]
}

fn inventory_command() -> impl Strategy<Value = InventoryCommand> {
    prop_oneof![
        any::<u64>().prop_map(InventoryCommand::Restock),
        (text(), any::<u64>()).prop_map(|(order, qty)| InventoryCommand::Reserve { order, qty }),
        text().prop_map(|order| InventoryCommand::Release { order }),
        text().prop_map(|order| InventoryCommand::Ship { order }),
    ]
}

fn inventory_event() -> impl Strategy<Value = InventoryEvent> {
    prop_oneof![
        any::<u64>().prop_map(|qty| InventoryEvent::Restocked { qty }),
        (text(), any::<u64>()).prop_map(|(order, qty)| InventoryEvent::Reserved { order, qty }),
        text().prop_map(|order| InventoryEvent::Released { order }),
        text().prop_map(|order| InventoryEvent::Shipped { order }),
    ]
}

fn inventory_event_v1() -> impl Strategy<Value = inventory::v1::InventoryEvent> {
    use inventory::v1::InventoryEvent as V1;
    prop_oneof![
        any::<u32>().prop_map(|qty| V1::Restocked { qty }),
        (text(), any::<u64>()).prop_map(|(order, qty)| V1::Reserved { order, qty }),
        text().prop_map(|order| V1::Released { order }),
        text().prop_map(|order| V1::Shipped { order }),
    ]
}

fn stock() -> impl Strategy<Value = Stock> {
    (any::<u64>(), prop::collection::btree_map(text(), any::<u64>(), 0..5))
        .prop_map(|(on_hand, reservations)| Stock { on_hand, reservations })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn output_record() -> impl Strategy<Value = OutputRecord> {
    (text(), prop::option::of(bytes(20)), prop::option::of(bytes(40)), prop::collection::vec((text(), bytes(10)), 0..3))
        .prop_map(|(topic, key, value, headers)| OutputRecord { topic, key, value, headers })
}

/// `values` encoded with either codec, and mutations of that: decoding returns, gives back the
/// value encoded, and whatever decodes re-encodes to bytes that decode to the same value.
fn fuzz_codec<T>(name: &str, values: impl Strategy<Value = T> + Send + 'static)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug + Clone + Send + 'static,
{
    let cases = (values, codec()).prop_flat_map(|(value, codec)| {
        let seed = codec.encode(&value).unwrap();
        (Just(value), Just(codec), mutated(seed))
    });
    Fuzz::new(name).run(cases, |(value, codec, bytes)| {
        prop_assert_eq!(codec.decode::<T>(&codec.encode(&value).unwrap()), Ok(value));
        if let Ok(decoded) = codec.decode::<T>(&bytes) {
            prop_assert_eq!(codec.decode::<T>(&codec.encode(&decoded).unwrap()), Ok(decoded));
        }
        Ok(())
    });
}

#[test]
fn fuzz_codec_bank_command() {
    fuzz_codec("codec: BankCommand", bank_command());
}

#[test]
fn fuzz_codec_bank_event() {
    fuzz_codec("codec: BankEvent", bank_event());
}

#[test]
fn fuzz_codec_bank_state() {
    fuzz_codec("codec: Account", account());
}

#[test]
fn fuzz_codec_bank_rejection_and_limited() {
    fuzz_codec("codec: BankRejection", bank_rejection());
    fuzz_codec(
        "codec: Limited",
        (bank_command(), prop::option::of(any::<u64>())).prop_map(|(command, limit)| Limited { command, limit }),
    );
}

#[test]
fn fuzz_codec_inventory() {
    fuzz_codec("codec: InventoryCommand", inventory_command());
    fuzz_codec("codec: Stock", stock());
}

/// The flow's sled outbox: `Vec<OutputRecord>` in bincode.
#[test]
fn fuzz_codec_outbox() {
    fuzz_codec("codec: outbox", prop::collection::vec(output_record(), 0..4));
}

/// Stored events go through `EventSourced::upcast` with the envelope's version and codec.
#[test]
fn fuzz_upcast() {
    let seeds = prop_oneof![
        (bank_event(), codec()).prop_map(|(e, c)| (0u8, 1u16, c, c.encode(&e).unwrap())),
        (inventory_event_v1(), codec()).prop_map(|(e, c)| (1, 1, c, c.encode(&e).unwrap())),
        (inventory_event(), codec()).prop_map(|(e, c)| (1, 2, c, c.encode(&e).unwrap())),
    ];
    let cases = seeds.prop_flat_map(|(stage, version, codec, seed)| {
        (Just((stage, version, codec, seed.clone())), prop_oneof![Just(version), any::<u16>()], mutated(seed))
    });
    Fuzz::new("EventSourced::upcast").run(cases, |((stage, version, codec, seed), other_version, bytes)| {
        if stage == 0 {
            prop_assert!(Bank::upcast(version, codec, &seed).is_ok());
            let _ = Bank::upcast(other_version, codec, &bytes);
        } else {
            prop_assert!(Inventory::upcast(version, codec, &seed).is_ok());
            let _ = Inventory::upcast(other_version, codec, &bytes);
        }
        Ok(())
    });
}

fn journal_entry() -> impl Strategy<Value = JournalEntry> {
    let event = (bank_event(), codec(), any::<u64>())
        .prop_map(|(e, c, ts)| Envelope::event(c.id(), Bank::EVENT_VERSION, ts, c.encode(&e).unwrap()));
    let state = (account(), codec(), any::<u64>())
        .prop_map(|(a, c, ts)| Envelope::snapshot(c.id(), Bank::STATE_VERSION, ts, c.encode(&a).unwrap()));
    let source = (text(), any::<i32>(), any::<i64>()).prop_map(|(topic, partition, next_offset)| SourcePosition {
        topic,
        partition,
        next_offset,
    });
    (any::<u64>(), prop::collection::vec(event, 0..4), prop::option::of(state), prop::collection::vec(source, 0..3))
        .prop_map(|(last_seq, events, state, sources)| JournalEntry {
            last_seq: SeqNo(last_seq),
            events,
            state,
            sources,
        })
}

/// The entry's fields after its envelope header: last seq, event count, each event's length, the
/// state's length, then (type version 2) the source count and each source's topic length,
/// partition and offset.
fn entry_fields(entry: &JournalEntry) -> Vec<Field> {
    let mut fields = vec![Field::le(6, 2), Field::le(16, 4), Field::le(HEADER_LEN, 8), Field::le(HEADER_LEN + 8, 4)];
    let mut at = HEADER_LEN + 12;
    for e in &entry.events {
        fields.push(Field::le(at, 4));
        at += 4 + e.encoded_len();
    }
    fields.push(Field::le(at, 4));
    at += 4 + entry.state.as_ref().map_or(0, Envelope::encoded_len);
    if !entry.sources.is_empty() {
        fields.push(Field::le(at, 4));
        at += 4;
        for s in &entry.sources {
            fields.extend([
                Field::le(at, 2),
                Field::le(at + 2 + s.topic.len(), 4),
                Field::le(at + 6 + s.topic.len(), 8),
            ]);
            at += 14 + s.topic.len();
        }
    }
    fields
}

/// Kafka journal entries (a restore reads them from the journal topic and from the local state
/// store's rows): decoded, then their events and state decoded as a restore does.
#[test]
fn fuzz_journal_entry() {
    let cases = journal_entry().prop_flat_map(|entry| {
        let seed = entry.encode();
        let fields = entry_fields(&entry);
        (Just(entry), mutated_with(seed, fields, Some(0)))
    });
    Fuzz::new("JournalEntry::decode").run(cases, |(entry, bytes)| {
        prop_assert_eq!(JournalEntry::decode(&entry.encode()), Ok(entry.clone()));
        if let Ok(decoded) = JournalEntry::decode(&bytes) {
            prop_assert_eq!(JournalEntry::decode(&decoded.encode()), Ok(decoded.clone()));
            for e in &decoded.events {
                if let Ok(codec) = Codec::from_id(e.codec) {
                    let _ = Bank::upcast(e.type_version, codec, &e.payload);
                }
            }
            if let Some(state) = &decoded.state {
                if let Ok(codec) = Codec::from_id(state.codec) {
                    let _ = codec.decode::<Account>(&state.payload);
                }
            }
        }
        Ok(())
    });
}

fn wire_command() -> impl Strategy<Value = WireCommand> {
    let op = prop_oneof![
        Just(("open", None)),
        any::<u64>().prop_map(|a| ("deposit", Some(a))),
        any::<u64>().prop_map(|a| ("withdraw", Some(a))),
        Just(("close", None)),
    ];
    (text(), op).prop_map(|(id, (op, amount))| WireCommand { id, op: op.into(), amount })
}

fn expected(w: &WireCommand) -> BankCommand {
    match (w.op.as_str(), w.amount) {
        ("open", _) => BankCommand::Open,
        ("deposit", Some(a)) => BankCommand::Deposit(a),
        ("withdraw", Some(a)) => BankCommand::Withdraw(a),
        _ => BankCommand::Close,
    }
}

/// The bank flow's wire contract: the decoder of input records (key and JSON value) and the
/// output mapping, which reads the command id from the input again.
#[test]
fn fuzz_bank_flow_wire() {
    let cases = (wire_command(), text()).prop_flat_map(|(wire, account)| {
        let value = serde_json::to_vec(&wire).unwrap();
        (Just(wire), Just(account.clone()), mutated(account.into_bytes()), mutated(value), any::<bool>())
    });
    Fuzz::new("bank flow wire").run(cases, |(wire, account, key, value, keep_key)| {
        let record = |key: Vec<u8>, value: Vec<u8>| InputRecord::new("bank-commands", 0, 0, Some(key), Some(value));
        let valid = record(account.clone().into_bytes(), serde_json::to_vec(&wire).unwrap());
        prop_assert_eq!(bank_flow::decode(&valid).ok(), Some((account.clone(), expected(&wire))));
        let input = record(if keep_key { account.into_bytes() } else { key.clone() }, value);
        let _ = bank_flow::decode(&input);
        let topics = BankTopics::default();
        let outputs = |rec: &InputRecord, outcome: Result<u64, BankRejection>| {
            let key = String::from_utf8_lossy(rec.key.as_deref().unwrap_or_default()).into_owned();
            let processed = Processed::<Bank> {
                input: rec,
                key: &key,
                events: &[BankEvent::Opened],
                outcome: &outcome,
                state: &Account::default(),
                context: &(),
            };
            bank_flow::outputs(&topics, &processed)
        };
        let reply: WireReply = serde_json::from_slice(outputs(&valid, Ok(5))[0].value.as_deref().unwrap()).unwrap();
        prop_assert_eq!(reply.id, wire.id);
        outputs(&input, Err(BankRejection::NotOpen));
        Ok(())
    });
}

/// The table decoders of record keys and values (the bank's limits table: UTF-8 keys, JSON
/// numbers), also applied to the rows of a table's local store.
#[test]
fn fuzz_table_decoders() {
    let cases = (text(), any::<u64>(), stock(), codec()).prop_flat_map(|(key, limit, stock, c)| {
        let value = match c {
            Codec::Json => serde_json::to_vec(&stock).unwrap(),
            _ => Codec::Bincode.encode(&stock).unwrap(),
        };
        (
            Just((key.clone(), limit, stock, c)),
            mutated(key.into_bytes()),
            mutated(limit.to_string().into_bytes()),
            mutated(value),
        )
    });
    let (keys, limits) = (Decoder::utf8(), Decoder::<u64>::json());
    let (json, bincode) = (Decoder::<Stock>::json(), Decoder::<Stock>::bincode());
    Fuzz::new("table decoders").run(cases, move |((key, limit, stock, c), k, l, v)| {
        let values = if c == Codec::Json { &json } else { &bincode };
        prop_assert_eq!(keys.decode(key.as_bytes()), Ok(key));
        prop_assert_eq!(limits.decode(limit.to_string().as_bytes()), Ok(limit));
        let encoded = if c == Codec::Json { serde_json::to_vec(&stock).unwrap() } else { c.encode(&stock).unwrap() };
        prop_assert_eq!(values.decode(&encoded), Ok(stock));
        let _ = (keys.decode(&k), limits.decode(&l), json.decode(&v), bincode.decode(&v));
        Ok(())
    });
}
